"""Tool use against the real daemon and the bundled model, through the official SDK.

SmolLM2-135M is bad at tool use and its chat template knows no tools: that is the point. The
generic tool format is what runs here, and the grammar alone must make every call valid.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2 as httpx
import jsonschema
import pytest

from tests.integration.daemon import DaemonProcess, prompt_tokens

MODEL = "claude-sonnet-4-6"
GREEDY = {"temperature": 0}

CREATE_EVENT: dict[str, Any] = {
    "name": "create_event",
    "description": "Create a calendar event.",
    "input_schema": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 40},
            "date": {"type": "string", "format": "date"},
            "priority": {"type": "string", "enum": ["low", "normal", "high"]},
            "duration_minutes": {"type": "integer", "minimum": 15, "maximum": 240},
            "attendees": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "maxLength": 30},
                        "optional": {"type": "boolean"},
                    },
                    "required": ["name"],
                },
            },
            "location": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "room": {"type": "string", "pattern": "^[A-Z][0-9]{3}$"},
                    "floor": {"type": "integer", "minimum": 0, "maximum": 12},
                },
                "required": ["room"],
            },
        },
        "required": ["title", "date", "priority", "duration_minutes"],
    },
}

SEARCH_FILES: dict[str, Any] = {
    "name": "search_files",
    "description": "Find files whose name matches a glob.",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "glob": {"type": "string", "pattern": "^[a-z*./]{1,24}$"},
            "max_results": {"type": "integer", "exclusiveMinimum": 0, "maximum": 50},
            "include_hidden": {"type": "boolean"},
            "kind": {"anyOf": [{"const": "file"}, {"const": "directory"}]},
        },
        "required": ["glob", "max_results"],
    },
}

SET_THERMOSTAT: dict[str, Any] = {
    "name": "set_thermostat",
    "description": "Set a room's thermostat schedule.",
    "input_schema": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "room": {"enum": ["kitchen", "bedroom", "office"]},
            "celsius": {"type": "integer", "minimum": 10, "maximum": 30},
            "schedule": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "days": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 7,
                        "items": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
                    },
                    "start": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                },
                "required": ["days", "start"],
            },
        },
        "required": ["room", "celsius", "schedule"],
    },
}

WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
    },
}

TOOLS = [CREATE_EVENT, SEARCH_FILES, SET_THERMOSTAT]
SCHEMAS = {t["name"]: t["input_schema"] for t in [*TOOLS, WEATHER]}
PROMPTS = {
    "create_event": "Book a high priority team meeting called Planning on 2025-03-14 for an hour.",
    "search_files": "Find all python files in src, at most 20 results.",
    "set_thermostat": "Set the office to 21 degrees on weekdays from 08:00.",
}


def tool_uses(message: anthropic.types.Message) -> list[anthropic.types.ToolUseBlock]:
    return [b for b in message.content if b.type == "tool_use"]


def assert_valid_call(block: anthropic.types.ToolUseBlock, name: str | None = None) -> None:
    assert block.id.startswith("toolu_")
    if name is not None:
        assert block.name == name
    assert isinstance(block.input, dict)
    jsonschema.validate(block.input, SCHEMAS[block.name])


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t["name"])
def test_tool_choice_tool_gives_a_valid_call(daemon: DaemonProcess, tool: dict[str, Any]) -> None:
    message = daemon.client().messages.create(
        model=MODEL,
        max_tokens=200,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": tool["name"]},
        messages=[{"role": "user", "content": PROMPTS[tool["name"]]}],
        extra_body=GREEDY,
    )
    calls = tool_uses(message)
    assert len(calls) == 1, message.content
    assert_valid_call(calls[0], tool["name"])
    assert message.stop_reason == "tool_use"


def test_tool_choice_any_streamed_deltas_equal_the_input(daemon: DaemonProcess) -> None:
    partials: list[str] = []
    with daemon.client().messages.stream(
        model=MODEL,
        max_tokens=200,
        tools=TOOLS,
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": PROMPTS["set_thermostat"]}],
        extra_body=GREEDY,
    ) as stream:
        for event in stream:
            if event.type == "content_block_start":
                assert event.content_block.type == "tool_use"
                assert event.content_block.input == {}
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partials.append(event.delta.partial_json)
        final = stream.get_final_message()
    calls = tool_uses(final)
    assert len(calls) == 1
    assert_valid_call(calls[0])
    assert len(partials) > 1, "the input should stream in several deltas"
    assert json.loads("".join(partials)) == calls[0].input
    assert final.stop_reason == "tool_use"


def test_streamed_and_whole_replies_are_equivalent(daemon: DaemonProcess) -> None:
    """Claude Code re-sends a failed stream without `stream`: both must say the same."""
    request: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 200,
        "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "search_files"},
        "messages": [{"role": "user", "content": PROMPTS["search_files"]}],
        "extra_body": GREEDY,
    }
    client = daemon.client()
    # llama.cpp's numbers depend slightly on how much of the prompt came from the KV cache;
    # a first run puts the whole prompt there, so both compared runs start alike.
    client.messages.create(**request)
    whole = client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        streamed = stream.get_final_message()
    shape = [(b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in whole.content]
    assert shape == [
        (b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in streamed.content
    ]
    assert whole.stop_reason == streamed.stop_reason == "tool_use"
    assert whole.usage.output_tokens == streamed.usage.output_tokens


def test_round_trip_tool_result_then_reply(daemon: DaemonProcess) -> None:
    client = daemon.client()
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.messages.create(
        model=MODEL,
        max_tokens=120,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        messages=[question],
        extra_body=GREEDY,
    )
    call = tool_uses(first)[0]
    assert_valid_call(call, "get_weather")
    history: list[Any] = [
        question,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": [{"type": "text", "text": "Sunny and 24 degrees Celsius."}],
                }
            ],
        },
    ]
    second = client.messages.create(
        model=MODEL,
        max_tokens=40,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        messages=history,
        extra_body=GREEDY,
    )
    assert second.content and all(b.type == "text" for b in second.content)
    assert second.content[0].text.strip()
    assert second.stop_reason in ("end_turn", "max_tokens")
    # The whole history, tool call and result included, reached the prompt.
    assert prompt_tokens(second.usage) > prompt_tokens(first.usage) + 10
    counted = client.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=history)
    assert counted.input_tokens == prompt_tokens(second.usage)


def test_tool_result_errors_and_string_content_round_trip(daemon: DaemonProcess) -> None:
    message = daemon.client().messages.create(
        model=MODEL,
        max_tokens=120,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {
                        "type": "tool_use",
                        "id": "toolu_01",
                        "name": "get_weather",
                        "input": {"city": "Oslo"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01",
                        "content": "timeout",
                        "is_error": True,
                    },
                    {"type": "text", "text": "Try again please."},
                ],
            },
        ],
        extra_body=GREEDY,
    )
    assert_valid_call(tool_uses(message)[0], "get_weather")


def test_tool_choice_none_yields_text(daemon: DaemonProcess) -> None:
    message = daemon.client().messages.create(
        model=MODEL,
        max_tokens=40,
        tools=TOOLS,
        tool_choice={"type": "none"},
        messages=[{"role": "user", "content": PROMPTS["create_event"]}],
        extra_body=GREEDY,
    )
    assert not tool_uses(message)
    assert message.content[0].type == "text"
    assert message.stop_reason in ("end_turn", "max_tokens")


def test_auto_when_the_model_answers_in_text(daemon: DaemonProcess) -> None:
    message = daemon.client().messages.create(
        model=MODEL,
        max_tokens=40,
        tools=[WEATHER],
        messages=[{"role": "user", "content": "Say hello to me in French."}],
        extra_body=GREEDY,
    )
    assert not tool_uses(message), message.content
    assert message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")


@pytest.mark.parametrize(
    ("choice", "tools", "wording"),
    [
        ({"type": "tool", "name": "nope"}, [WEATHER], "tool_choice.name"),
        ({"type": "tool"}, [WEATHER], "tool_choice.name"),
        ({"type": "any"}, [], "tool_choice.type"),
    ],
)
def test_bad_tool_choice_is_400(
    daemon: DaemonProcess, choice: dict[str, Any], tools: list[Any], wording: str
) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 5,
        "tools": tools,
        "tool_choice": choice,
        "messages": [{"role": "user", "content": "hi"}],
    }
    r = httpx.post(daemon.base_url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and wording in error["message"]


def test_structured_output_follows_the_schema(daemon: DaemonProcess) -> None:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "tags": {"type": "array", "items": {"enum": ["bug", "feature", "docs"]}, "maxItems": 2},
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["title", "tags", "score"],
    }
    with daemon.client().messages.stream(
        model=MODEL,
        max_tokens=80,
        messages=[{"role": "user", "content": "Summarise: the login button crashes the app."}],
        extra_body={
            **GREEDY,
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
        },
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn"
    jsonschema.validate(json.loads(final.content[0].text), schema)


def test_count_tokens_with_tools_and_system_matches_usage(daemon: DaemonProcess) -> None:
    client = daemon.client()
    request: dict[str, Any] = {
        "model": MODEL,
        "system": [
            {"type": "text", "text": "You schedule things.", "cache_control": {"type": "ephemeral"}}
        ],
        "tools": TOOLS,
        "messages": [{"role": "user", "content": PROMPTS["create_event"]}],
    }
    counted = client.messages.count_tokens(**request)
    message = client.messages.create(
        max_tokens=1, tool_choice={"type": "auto"}, extra_body=GREEDY, **request
    )
    assert counted.input_tokens == prompt_tokens(message.usage)
    without_tools = client.messages.count_tokens(
        model=MODEL, system=request["system"], messages=request["messages"]
    )
    assert counted.input_tokens > without_tools.input_tokens + 300


# ---- tool search: defer_loading and tool_reference, through the SDK's beta namespace ---------

TOOL_SEARCH_BETA = "advanced-tool-use-2025-11-20"
TOOL_SEARCH = {
    "name": "ToolSearch",
    "description": "Load deferred tools: query `select:NAME[,NAME...]`.",
    "input_schema": {
        "type": "object",
        "properties": {"query": {"type": "string"}},
        "required": ["query"],
    },
}
DEFERRED_EVENT = {**CREATE_EVENT, "defer_loading": True}


def _searched(*references: str) -> list[Any]:
    """A conversation in which the model searched for tools and got `references` back."""
    return [
        {"role": "user", "content": PROMPTS["create_event"]},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_search",
                    "name": "ToolSearch",
                    "input": {"query": "select:create_event"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_search",
                    "content": [{"type": "tool_reference", "tool_name": n} for n in references]
                    or "no tool matched",
                }
            ],
        },
    ]


def test_a_deferred_tool_counts_nothing_until_referenced(daemon: DaemonProcess) -> None:
    beta = daemon.client().beta.messages

    def count(tools: list[Any], messages: list[Any]) -> int:
        return beta.count_tokens(
            model=MODEL, betas=[TOOL_SEARCH_BETA], tools=tools, messages=messages
        ).input_tokens

    first_turn = _searched()[:1]
    assert count([TOOL_SEARCH, DEFERRED_EVENT], first_turn) == count([TOOL_SEARCH], first_turn)
    unloaded = count([TOOL_SEARCH, DEFERRED_EVENT], _searched())
    loaded = count([TOOL_SEARCH, DEFERRED_EVENT], _searched("create_event"))
    # The definition (its schema alone is ~1,000 characters) now stands in the tool result.
    assert loaded > unloaded + 150


def test_a_referenced_tool_is_called_and_the_prefix_is_read_from_cache(
    daemon: DaemonProcess,
) -> None:
    beta = daemon.client().beta.messages
    tools = [TOOL_SEARCH, DEFERRED_EVENT]
    search = beta.create(
        model=MODEL,
        max_tokens=1,
        betas=[TOOL_SEARCH_BETA],
        tools=tools,
        messages=_searched()[:1],
        extra_body=GREEDY,
    )
    assert search.usage.input_tokens > 0
    message = beta.create(
        model=MODEL,
        max_tokens=400,
        betas=[TOOL_SEARCH_BETA],
        tools=tools,
        tool_choice={"type": "tool", "name": "create_event"},
        messages=_searched("create_event"),
        extra_body=GREEDY,
    )
    call = next(b for b in message.content if b.type == "tool_use")
    assert call.name == "create_event"
    jsonschema.validate(call.input, CREATE_EVENT["input_schema"])
    # Loading the tool changed nothing before the tool result: the first turn's prompt, all
    # but the generation prompt's last tokens, is read back.
    assert message.usage.cache_read_input_tokens >= search.usage.input_tokens - 8


@pytest.mark.parametrize(
    ("tools", "messages", "needle"),
    [
        ([TOOL_SEARCH], _searched("create_event"), "messages.2.content.0.content.0.tool_name"),
        ([TOOL_SEARCH, TOOL_SEARCH], _searched()[:1], 'tools.1.name: tool "ToolSearch"'),
        ([DEFERRED_EVENT], _searched()[:1], "tools: every tool has defer_loading set"),
    ],
)
def test_tool_search_mistakes_are_400_naming_the_path(
    daemon: DaemonProcess, tools: list[Any], messages: list[Any], needle: str
) -> None:
    beta = daemon.client().beta.messages
    for call in (
        lambda: beta.count_tokens(
            model=MODEL, betas=[TOOL_SEARCH_BETA], tools=tools, messages=messages
        ),
        lambda: beta.create(
            model=MODEL, max_tokens=1, betas=[TOOL_SEARCH_BETA], tools=tools, messages=messages
        ),
    ):
        with pytest.raises(anthropic.BadRequestError) as error:
            call()
        assert error.value.status_code == 400
        assert needle in error.value.message


def test_an_unknown_block_type_or_role_is_one_line(daemon: DaemonProcess) -> None:
    for messages, expected in (
        (
            [{"role": "user", "content": [{"type": "server_tool_use", "id": "s", "input": {}}]}],
            'messages.0.content.0: block type "server_tool_use" is not supported',
        ),
        (
            [{"role": "ctx", "content": "x"}],
            'messages.0.role: role "ctx" is not supported: use user or assistant',
        ),
    ):
        response = httpx.post(
            f"{daemon.base_url}/v1/messages",
            json={"model": MODEL, "max_tokens": 1, "messages": messages},
            headers={"anthropic-version": "2023-06-01"},
        )
        assert response.status_code == 400
        assert response.json()["error"] == {"type": "invalid_request_error", "message": expected}
