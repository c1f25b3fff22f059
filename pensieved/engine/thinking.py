"""Separating `<think>` reasoning from the answer, for models that reason in those tags.

Qwen3, QwQ, DeepSeek-R1 distills and similar models write `<think>...</think>` before their
answer (some chat templates open the tag in the generation prompt already). A model that never
writes the tag passes through untouched, so this runs for every model at no cost.
"""

from __future__ import annotations

from pensieved.engine.holdback import held_prefix

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def prompt_opens_thinking(rendered_prompt: str, open_tag: str = THINK_OPEN) -> bool:
    """Whether the generation prompt ends inside a reasoning block the template opened."""
    tail = rendered_prompt.rstrip()
    return tail.endswith(open_tag)


class ThinkSplitter:
    """Feed generated text; get (is_thinking, text) pieces back as soon as they are decided.

    The tags are the model family's (`<think>`, `<seed:think>`, `[THINK]`, harmony's
    analysis channel header and `<|end|>`)."""

    def __init__(
        self,
        *,
        start_open: bool = False,
        open_tag: str = THINK_OPEN,
        close_tag: str = THINK_CLOSE,
        ends: tuple[str, ...] = (),
    ) -> None:
        self._open, self._close = open_tag, close_tag
        self._ends = ends  # what also ends the reasoning, kept as the answer's start
        self._state = "thinking" if start_open else "start"  # start | thinking | after | text
        self._buffer = ""
        self._fresh = True  # nothing of the reasoning seen yet

    def feed(self, text: str) -> list[tuple[bool, str]]:
        self._buffer += text
        out: list[tuple[bool, str]] = []
        while True:
            state, size = self._state, len(self._buffer)
            self._step(out)
            if (self._state, len(self._buffer)) == (state, size):
                return [(thinking, piece) for thinking, piece in out if piece]

    def _step(self, out: list[tuple[bool, str]]) -> None:
        if self._state == "start":
            stripped = self._buffer.lstrip()
            if stripped.startswith(self._open):
                self._buffer = stripped[len(self._open) :].lstrip("\n")
                self._state = "thinking"
            elif stripped and not self._open.startswith(stripped):
                self._state = "text"
        elif self._state == "thinking":
            if self._fresh:  # the line break after `<think>` is layout too
                self._buffer = self._buffer.lstrip("\n")
                if not self._buffer:
                    return
                self._fresh = False
            found = [(self._buffer.find(tag), tag) for tag in (self._close, *self._ends)]
            hits = [(at, tag) for at, tag in found if at >= 0]
            if hits:
                at, tag = min(hits)
                out.append((True, self._buffer[:at].rstrip("\n")))
                kept = at if tag in self._ends else at + len(tag)
                self._buffer = self._buffer[kept:]
                self._state = "after"
                return
            # Held: a possible start of `</think>` and the line breaks before it, which are
            # layout around the tag, not reasoning.
            keep = held_prefix(self._buffer, self._close, *self._ends)
            cut = len(self._buffer) - keep
            cut -= _trailing_newlines(self._buffer[:cut])
            if cut > 0:
                out.append((True, self._buffer[:cut]))
                self._buffer = self._buffer[cut:]
        elif self._state == "after":
            # The blank lines between `</think>` and the answer belong to neither.
            stripped = self._buffer.lstrip()
            if stripped:
                self._buffer = stripped
                self._state = "text"
            else:
                self._buffer = ""
        elif self._state == "text" and self._buffer:
            out.append((False, self._buffer))
            self._buffer = ""

    def finish(self) -> list[tuple[bool, str]]:
        """The output ended: whatever is held goes out (reasoning cut short stays reasoning)."""
        text, self._buffer = self._buffer, ""
        if not text:
            return []
        if self._state == "thinking":
            return [(True, text.rstrip("\n"))] if text.strip() else []
        if self._state == "after":
            return []
        return [(False, text)]


def _trailing_newlines(text: str) -> int:
    return len(text) - len(text.rstrip("\n"))
