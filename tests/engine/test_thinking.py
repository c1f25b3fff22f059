"""Splitting `<think>` reasoning from the answer."""

from __future__ import annotations

import pytest

from pensieved.engine.thinking import ThinkSplitter, prompt_opens_thinking


def split(text: str, *, chunk: int, start_open: bool = False) -> tuple[str, str]:
    splitter = ThinkSplitter(start_open=start_open)
    pieces = []
    for i in range(0, len(text), chunk):
        pieces += splitter.feed(text[i : i + chunk])
    pieces += splitter.finish()
    thinking = "".join(p for t, p in pieces if t)
    answer = "".join(p for t, p in pieces if not t)
    return thinking, answer


@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
def test_think_block_is_split_off(chunk: int) -> None:
    text = "<think>\nLet me see.\n2+2=4\n</think>\n\nThe answer is 4."
    assert split(text, chunk=chunk) == ("Let me see.\n2+2=4", "The answer is 4.")


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_model_without_think_tags_passes_through(chunk: int) -> None:
    text = "  <thin air> is not a tag. <think>late tags stay text</think>"
    assert split(text, chunk=chunk) == ("", text)


def test_prompt_that_opened_the_block() -> None:
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert split("reasoning</think>answer", chunk=4, start_open=True) == ("reasoning", "answer")


def test_reasoning_cut_short_stays_reasoning() -> None:
    assert split("<think>still going", chunk=3) == ("still going", "")
