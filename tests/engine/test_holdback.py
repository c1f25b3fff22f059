from __future__ import annotations

import pytest

from pensieved.engine.holdback import held_prefix


@pytest.mark.parametrize(
    ("text", "markers", "held"),
    [
        ("hello <tool", ("<tool_call>",), 5),
        ("hello <tool_call", ("<tool_call>",), 10),
        ("hello <tool_call>", ("<tool_call>",), 0),  # the whole marker is the caller's to find
        ("hello", ("<tool_call>",), 0),
        ("", ("<think>",), 0),
        ("<", ("<think>",), 1),
        ("a</th", ("</think>",), 4),
        ("x ST", ("STOP", "S"), 2),  # the longest tail over all markers
        ("x S", ("STOP", "XS"), 1),
        ("abc", ("",), 0),
        ("abc", (), 0),
    ],
)
def test_held_prefix(text: str, markers: tuple[str, ...], held: int) -> None:
    assert held_prefix(text, *markers) == held
