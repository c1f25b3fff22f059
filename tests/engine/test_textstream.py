from __future__ import annotations

from pensieved.engine.textstream import TextStream


def feed_all(stream: TextStream, chunks: list[bytes]) -> tuple[str, str | None]:
    out = ""
    for chunk in chunks:
        result = stream.feed(chunk)
        out += result.text
        if result.stop_sequence:
            return out, result.stop_sequence
    return out + stream.finish(), None


def test_plain_text_passes_through_immediately() -> None:
    stream = TextStream()
    assert stream.feed(b"Hello").text == "Hello"
    assert stream.feed(b" world").text == " world"


def test_utf8_split_across_tokens_is_held() -> None:
    stream = TextStream()
    snowman = "☃".encode()
    assert stream.feed(snowman[:1]).text == ""
    assert stream.feed(snowman[1:2]).text == ""
    assert stream.feed(snowman[2:]).text == "☃"


def test_invalid_bytes_become_replacement_char() -> None:
    stream = TextStream()
    text = stream.feed(b"a\xffb").text + stream.finish()
    assert text == "a\ufffdb"


def test_stop_sequence_across_tokens() -> None:
    stream = TextStream(("END",))
    assert stream.feed(b"abc E").text == "abc "
    assert stream.feed(b"N").text == ""
    result = stream.feed(b"D and more")
    assert result.stop_sequence == "END"
    assert result.text == ""


def test_false_start_is_released() -> None:
    stream = TextStream(("END",))
    assert stream.feed(b"E").text == ""
    assert stream.feed(b"NX").text == "ENX"


def test_earliest_stop_wins() -> None:
    text, stop = feed_all(TextStream(("world", "lo")), [b"hello world"])
    assert (text, stop) == ("hel", "lo")


def test_held_text_released_at_end() -> None:
    text, stop = feed_all(TextStream(("STOP",)), [b"ends with ST"])
    assert (text, stop) == ("ends with ST", None)
