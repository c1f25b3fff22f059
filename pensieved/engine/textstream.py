"""Turning generated token bytes into text a client may see, safely and early.

Two hazards sit between the sampler and the wire: a token can end in the middle of a UTF-8
character, and text can be the start of a stop sequence that is only completed by a later token.
`TextStream` holds back exactly as much as those two require and no more.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from pensieved.engine.holdback import held_prefix


@dataclass(frozen=True)
class StreamOutput:
    text: str  # safe to emit now
    stop_sequence: str | None = None  # set when a stop sequence was completed


class TextStream:
    def __init__(self, stop_sequences: tuple[str, ...] = ()) -> None:
        # "replace": a model can emit invalid byte sequences; the client gets U+FFFD, not a crash.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stop_sequences if s)
        self._held = ""

    def feed(self, data: bytes) -> StreamOutput:
        """Add the bytes of one token; returns what can be shown and whether a stop matched."""
        self._held += self._decoder.decode(data)
        if not self._stops:
            text, self._held = self._held, ""
            return StreamOutput(text)
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = self._held.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            text = self._held[: first[0]]
            self._held = ""
            return StreamOutput(text, stop_sequence=first[1])
        keep = held_prefix(self._held, *self._stops)
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return StreamOutput(text)

    def finish(self) -> str:
        """The generation ended without a stop sequence: release everything held back."""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text
