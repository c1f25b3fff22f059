"""Which dialect a chat template speaks, found by rendering a probe call through it.

A conversation whose assistant turn calls a probe tool is rendered with the template; the
first dialect (in the registry's order) whose own parser reads that rendering back as the
same call is the template's. This is how the syntax is learned from the template itself
rather than from the model's name, so a fine-tune with its parent's template is detected too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from pensieved.engine.dialects import DIALECTS, Dialect, by_name, default_dialect
from pensieved.engine.markers import TOOL_CALL_OPEN
from pensieved.engine.types import ChatMessage, ToolCall, ToolCallEnd, ToolCallStart, ToolSpec

PROBE_TOOL = "pensieve_probe_tool"
# Nine letters and digits: Mistral Small 3.2's and Nemo's templates refuse any other call id.
PROBE_CALL_ID = "call00001"
_PROBE_ARGS = {"probe_path": "probe-value-7f3a", "probe_count": 42}
_PROBE_SPEC = ToolSpec(
    PROBE_TOOL,
    "probe",
    {
        "type": "object",
        "properties": {"probe_path": {"type": "string"}, "probe_count": {"type": "integer"}},
        "required": ["probe_path", "probe_count"],
    },
)

DialectSource = Literal["configured", "detected", "generic"]


@dataclass(frozen=True)
class DialectChoice:
    """The dialect in force for a template, and how it was chosen: `configured`
    (`tool_dialect`), `detected` (from the template) or `generic` (the template renders no
    calls we can read: our own tool section, in hermes)."""

    dialect: Dialect
    source: DialectSource


GENERIC = DialectChoice(default_dialect(), "generic")


def probe_render(source: str) -> str | None:
    """The template's rendering of a conversation with one probe call (None: it fails)."""
    from pensieved.engine.prompt import render_plain

    messages = [
        ChatMessage("user", "probe"),
        ChatMessage(
            "assistant", "", tool_calls=(ToolCall(PROBE_CALL_ID, PROBE_TOOL, _PROBE_ARGS),)
        ),
        ChatMessage("tool", "probe result", tool_call_id=PROBE_CALL_ID, name=PROBE_TOOL),
    ]
    return render_plain(source, messages, tools=[_PROBE_SPEC])


def reads_probe(dialect: Dialect, rendered: str) -> bool:
    """Whether `dialect`'s parser reads the probe call back from `rendered`."""
    parser = dialect.new_parser([_PROBE_SPEC])
    events = parser.feed(rendered) + parser.finish()
    names = [e.name for e in events if isinstance(e, ToolCallStart)]
    inputs = [e.input for e in events if isinstance(e, ToolCallEnd) and e.complete]
    return names[:1] == [PROBE_TOOL] and inputs[:1] == [_PROBE_ARGS]


@lru_cache(maxsize=16)
def detect(source: str | None) -> Dialect | None:
    """The dialect `source` renders calls in, or None."""
    if not source:
        return None
    rendered = probe_render(source)
    if rendered is None:
        return None
    found = next((d for d in DIALECTS if reads_probe(d, rendered)), None)
    written = str(_PROBE_ARGS["probe_path"]) in rendered
    if found is None and not written and TOOL_CALL_OPEN in source and _lists_tools(source):
        # Renders the tools and speaks of `<tool_call>` but leaves calls out of the history:
        # what it teaches is Hermes.
        return default_dialect()
    return found


def _lists_tools(source: str) -> bool:
    from pensieved.engine.prompt import render_plain

    rendered = render_plain(source, [ChatMessage("user", "probe")], tools=[_PROBE_SPEC])
    return rendered is not None and PROBE_TOOL in rendered


def choose(source: str | None, setting: str = "auto") -> DialectChoice:
    """The dialect for a template given the `tool_dialect` setting."""
    if setting != "auto":
        return DialectChoice(by_name(setting), "configured")
    found = detect(source)
    if found is not None:
        return DialectChoice(found, "detected")
    return GENERIC
