"""How much streamed text to hold back because a later piece may complete a marker.

A marker (`<think>`, `<tool_call>`, a stop sequence) can arrive split across tokens; the text
that may be its start is held until the next piece decides it, and no more than that.
"""

from __future__ import annotations


def held_prefix(text: str, *markers: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:length]):
                best = length
                break
    return best
