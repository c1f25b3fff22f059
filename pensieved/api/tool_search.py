"""Tool search, served as Anthropic serves it.

A client marks rarely used tools `defer_loading: true` and offers a search tool of its own
(Claude Code's `ToolSearch`). A deferred tool is not in the prompt, and the model cannot call
it, until a `tool_reference` block in a tool result names it. From then on it is callable, and
its definition is rendered where the reference stands, inside that tool result: the tokens
before it are the same as on the turn before, so the cached prefix holds.

The checks follow Anthropic's documented errors: tool names are unique, a reference names a
tool in `tools`, and not every tool may be deferred.
"""

from __future__ import annotations

from collections.abc import Iterator

from pensieved.engine.types import ToolSpec
from pensieved.errors import InvalidRequestError
from pensieved.wire.anthropic import (
    Tool,
    ToolReferenceBlock,
    ToolResultBlock,
    _PromptFields,
)


def _spec(tool: Tool) -> ToolSpec:
    return ToolSpec(
        name=tool.name,
        description=tool.description,
        parameters=tool.input_schema,
        deferred=tool.defer_loading,
    )


def _client_tools(request: _PromptFields) -> dict[str, Tool]:
    """The request's tools by name, after the checks that need no conversation."""
    tools: dict[str, Tool] = {}
    first: dict[str, int] = {}
    for index, tool in enumerate(request.tools or ()):
        if tool.type not in (None, "custom"):
            raise InvalidRequestError(
                f'tools.{index}: tool type "{tool.type}" is one of Anthropic\'s server tools, '
                "which a local model cannot run; leave it out or route this model to an upstream"
            )
        if tool.name in tools:
            raise InvalidRequestError(
                f'tools.{index}.name: tool "{tool.name}" is named twice '
                f"(also tools.{first[tool.name]}); tool names must be unique"
            )
        tools[tool.name], first[tool.name] = tool, index
    if tools and all(tool.defer_loading for tool in tools.values()):
        raise InvalidRequestError(
            "tools: every tool has defer_loading set; at least one must be loaded up front "
            "(the tool search tool, at least)"
        )
    return tools


def _references(request: _PromptFields) -> Iterator[tuple[str, ToolReferenceBlock]]:
    """Every tool_reference in the conversation, with its path."""
    for m, message in enumerate(request.messages):
        if isinstance(message.content, str):
            continue
        for b, block in enumerate(message.content):
            if isinstance(block, ToolResultBlock) and isinstance(block.content, list):
                for p, part in enumerate(block.content):
                    if isinstance(part, ToolReferenceBlock):
                        yield f"messages.{m}.content.{b}.content.{p}", part


class ToolTable:
    """A request's tools: which the model may call, and what a tool_reference loads."""

    def __init__(self, request: _PromptFields) -> None:
        tools = _client_tools(request)
        loaded: set[str] = set()
        for where, reference in _references(request):
            if reference.tool_name not in tools:
                raise InvalidRequestError(
                    f'{where}.tool_name: tool "{reference.tool_name}" is referenced but not '
                    "in `tools`; a tool_reference must name one of the request's tools"
                )
            loaded.add(reference.tool_name)
        self._tools = tools
        # Deferred tools that no reference loaded are neither shown nor callable.
        self.callable: tuple[ToolSpec, ...] = tuple(
            _spec(tool) for tool in tools.values() if not tool.defer_loading or tool.name in loaded
        )

    def loaded(self, name: str) -> ToolSpec:
        """The tool a tool_reference names (known to exist: the constructor checked)."""
        return _spec(self._tools[name])

    def check_choice(self, name: str) -> None:
        """A forced tool must be one the model may call now."""
        if name not in self._tools:
            raise InvalidRequestError(
                f"tool_choice.name: tool '{name}' is not among the request's tools"
            )
        if all(spec.name != name for spec in self.callable):
            raise InvalidRequestError(
                f"tool_choice.name: tool '{name}' is deferred (defer_loading) and no "
                "tool_reference has loaded it yet"
            )
