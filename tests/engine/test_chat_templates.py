"""Every real chat template renders every Claude Code capture, as `model.chat_template` set to
the template's file makes the daemon render it (`template_source`, then `render_request`).

The templates are tests/chat_templates' 70, the requests tests/claude_code_captures' (both
versions, tool round trips included).
A template that cannot be made to render goes in DROPPED with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pensieved.api.convert import to_generation_request
from pensieved.engine.prompt import render_request, template_caps
from pensieved.engine.templates import template_source
from pensieved.engine.types import GenerationRequest
from pensieved.wire.anthropic import CountTokensRequest, MessagesRequest
from tests.chat_templates import TEMPLATES, template_files
from tests.claude_code_captures import capture_files, load

EXPECTED = 70  # the folder's templates: fewer means the fixtures changed, not that all render

# Template file -> why it is not rendered. Empty: every one renders.
DROPPED: dict[str, str] = {}

pytestmark = pytest.mark.skipif(
    not TEMPLATES.is_dir() or not capture_files(),
    reason=f"the chat templates ({TEMPLATES}) or the Claude Code captures are absent",
)


def _request(path: Path) -> tuple[str, GenerationRequest]:
    capture = load(path)
    shape = CountTokensRequest if capture.count_tokens else MessagesRequest
    return capture.id, to_generation_request(shape.model_validate(capture.body))


CAPTURES = [_request(path) for path in capture_files()]


def rendered(source: str, request: GenerationRequest) -> str:
    text, contents = render_request(source, request, bos_text="<BOS>", eos_text="<EOS>")
    for index, content in enumerate(contents):
        text = text.replace(f"\ue000{index}\ue001", content)
    return text


def problems(text: str, request: GenerationRequest) -> list[str]:
    """What of the request is missing from its rendered prompt."""
    found: list[str] = []
    if "\ue000" in text or "\ue001" in text:
        found.append("a content marker was cut or left unreplaced")
    users = [m.content for m in request.messages if m.role == "user" and m.content]
    if users and users[-1] not in text:
        found.append("the last user message's text is missing")
    for message in request.messages:
        if message.role == "system" and message.content not in text:
            found.append(f"a system message is missing: {message.content[:60]!r}")
        if message.role == "tool" and message.content not in text:
            found.append(f"the result of {message.tool_call_id} is missing")
    for tool in request.tools:
        if not tool.deferred and tool.name not in text:
            found.append(f"tool {tool.name} is not listed")
    return found


def test_the_captures_hold_tool_round_trips_and_both_versions() -> None:
    ids = [capture_id for capture_id, _ in CAPTURES]
    assert any("/" in capture_id for capture_id in ids)  # a version folder's
    assert any("/" not in capture_id for capture_id in ids)  # the top folder's
    round_trips = [r for _, r in CAPTURES if any(m.role == "tool" for m in r.messages)]
    assert len(round_trips) >= 2
    assert all(any(m.tool_calls for m in r.messages) for r in round_trips)


def test_every_template_is_rendered_or_listed_as_dropped() -> None:
    names = {path.name for path in template_files()}
    assert len(names) == EXPECTED
    assert set(DROPPED) <= names
    assert len(names - set(DROPPED)) == EXPECTED - len(DROPPED)


@pytest.mark.parametrize("path", template_files(), ids=lambda path: path.stem)
def test_the_template_renders_every_capture(path: Path) -> None:
    if path.name in DROPPED:
        pytest.skip(DROPPED[path.name])
    source = template_source(str(path))
    assert template_caps(source).error is None
    failures = {}
    for capture_id, request in CAPTURES:
        found = problems(rendered(source, request), request)
        if found:
            failures[capture_id] = found
    assert not failures, failures


def test_a_template_that_takes_only_short_call_ids_gets_them() -> None:
    """Mistral Small 3.2's template refuses any call id but nine letters and digits: Claude
    Code's `toolu_…` ids reach it as such, the same one for a call and its result, on every
    turn (so turn two renders turn one's history as turn one did)."""
    from pensieved.engine.prompt import short_id

    source = template_source(str(TEMPLATES / "Mistral-Small-3.2-24B-Instruct-2506.jinja"))
    caps = template_caps(source)
    assert (caps.tools, caps.short_ids, caps.dialect.dialect.name) == (True, True, "mistral")
    devstral = template_source(str(TEMPLATES / "unsloth-mistral-Devstral-Small-2507.jinja"))
    assert not template_caps(devstral).short_ids
    round_trips = [r for _, r in CAPTURES if any(m.role == "tool" for m in r.messages)]
    call = next(c for m in round_trips[0].messages for c in m.tool_calls)
    short = short_id(call.id)
    assert call.id.startswith("toolu_") and len(short) == 9 and short.isalnum()
    assert short_id(call.id) == short and short_id(short) == short
    text = rendered(source, round_trips[0])
    assert f"[CALL_ID]{short}[ARGS]" in text and f"[TOOL_RESULTS]{short}[TOOL_CONTENT]" in text
