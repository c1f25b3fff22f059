"""Tool search: deferred tools, tool_reference blocks, and the 400s Anthropic documents."""

from __future__ import annotations

from typing import Any

import pytest

from pensieved.api.convert import to_generation_request
from pensieved.engine.prompt import TemplateCaps, conversation_for_template
from pensieved.engine.tools import loaded_tool_text
from pensieved.engine.types import GenerationRequest
from pensieved.errors import InvalidRequestError
from pensieved.wire.anthropic import MessagesRequest

BASH = {"name": "Bash", "input_schema": {"type": "object", "properties": {"cmd": {}}}}
SEARCH = {"name": "ToolSearch", "input_schema": {"type": "object"}}
TASK = {
    "name": "TaskCreate",
    "description": "Create a task",
    "input_schema": {"type": "object", "properties": {"subject": {"type": "string"}}},
    "defer_loading": True,
}
FETCH = {"name": "WebFetch", "input_schema": {"type": "object"}, "defer_loading": True}
SEARCH_CALL = {
    "type": "tool_use",
    "id": "toolu_1",
    "name": "ToolSearch",
    "input": {"query": "select:TaskCreate"},
}


def reference_result(*names: str) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "tool_reference", "tool_name": n} for n in names],
    }


def converted(tools: list[dict[str, Any]], *results: dict[str, Any]) -> GenerationRequest:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "make a task"}]
    if results:
        messages += [
            {"role": "assistant", "content": [SEARCH_CALL]},
            {"role": "user", "content": list(results)},
        ]
    body = {"model": "m", "max_tokens": 8, "messages": messages, "tools": tools}
    return to_generation_request(MessagesRequest.model_validate(body))


def test_a_deferred_tool_is_neither_listed_nor_callable_until_referenced() -> None:
    before = converted([BASH, SEARCH, TASK, FETCH])
    assert [t.name for t in before.tools] == ["Bash", "ToolSearch"]
    after = converted([BASH, SEARCH, TASK, FETCH], reference_result("TaskCreate"))
    assert [(t.name, t.deferred) for t in after.tools] == [
        ("Bash", False),
        ("ToolSearch", False),
        ("TaskCreate", True),
    ]


def test_the_reference_renders_the_definition_inside_the_tool_result() -> None:
    request = converted([BASH, SEARCH, TASK], reference_result("TaskCreate"))
    result = next(m for m in request.messages if m.role == "tool")
    task = next(t for t in request.tools if t.name == "TaskCreate")
    assert result.content == loaded_tool_text(task)
    assert '"subject"' in result.content and "Create a task" in result.content


@pytest.mark.parametrize("native", [True, False])
def test_loading_a_tool_changes_nothing_before_the_tool_result(native: bool) -> None:
    """The same conversation with a plain tool result and with the reference: the template
    gets the same tool list and the same messages up to the result."""
    caps = TemplateCaps(tools=native, system_mid=True)
    plain_result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}
    plain = converted([BASH, SEARCH, TASK], plain_result)
    loaded = converted([BASH, SEARCH, TASK], reference_result("TaskCreate"))
    first, listed_first = conversation_for_template(caps, plain.messages, plain.tools)
    second, listed_second = conversation_for_template(caps, loaded.messages, loaded.tools)
    assert [t.name for t in listed_first] == [t.name for t in listed_second]
    assert "TaskCreate" not in str(listed_second)
    assert first[:-1] == second[:-1]
    assert '"subject"' in second[-1].content and '"subject"' not in first[-1].content


@pytest.mark.parametrize(
    ("tools", "results", "message"),
    [
        (
            [BASH, SEARCH],
            [reference_result("TaskCreate")],
            'messages.2.content.0.content.0.tool_name: tool "TaskCreate" is referenced but not in',
        ),
        ([BASH, BASH], [], 'tools.1.name: tool "Bash" is named twice'),
        ([TASK, FETCH], [], "tools: every tool has defer_loading set"),
        (
            [BASH, {"type": "web_search_20250305", "name": "web_search"}],
            [],
            'tools.1: tool type "web_search_20250305" is one of Anthropic\'s server tools',
        ),
    ],
)
def test_documented_errors_name_the_path(
    tools: list[dict[str, Any]], results: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(InvalidRequestError) as error:
        converted(tools, *results)
    assert str(error.value).startswith(message)


def test_a_forced_tool_must_be_loaded() -> None:
    body = {
        "model": "m",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [BASH, TASK],
        "tool_choice": {"type": "tool", "name": "TaskCreate"},
    }
    with pytest.raises(InvalidRequestError, match=r"deferred .* no tool_reference has loaded it"):
        to_generation_request(MessagesRequest.model_validate(body))
