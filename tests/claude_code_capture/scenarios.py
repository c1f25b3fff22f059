"""The sessions a capture runs, and the file each of their requests is written to.

File names depend only on the scenario and on the order and kind of its requests, never on
ids or times: a main-thread request takes the scenario's next name (`p-toolsearch-first`, then
`p-toolsearch-result`), a subagent's requests (they carry `x-claude-code-agent-id`) are
`<scenario>-<label>`, `<scenario>-<label>-2`, ..., and count_tokens requests are
`<scenario>-count-tokens-<k>`; anything else is `<scenario>-models-<k>` or
`<scenario>-<method>-<k>` (`p-bash-head-1`: 2.1.197's connectivity check).
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.claude_code_capture.server import Json, ToolCall

MODEL = "claude-sonnet-4-5"
AGENT_HEADER = "x-claude-code-agent-id"


@dataclass(frozen=True)
class Scenario:
    """One Claude Code session, run against the capture server."""

    name: str
    what: str = ""
    prompt: str = "Say hello"
    # An interactive session types these after `prompt`, one turn each.
    follow_ups: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    tool_call: ToolCall | None = None
    # Names for the main thread's Messages requests, in order; later ones are <scenario>-<k>.
    main_names: tuple[str, ...] = ()
    subagent_label: str = "subagent"
    interactive: bool = False
    # Main-thread and subagent Messages requests without which the capture is incomplete.
    expected: int = 1
    expected_subagent: int = 0


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="p-default",
        what=f'`claude -p "Say hello" --model {MODEL}`',
        main_names=("p-default",),
    ),
    Scenario(
        name="p-bash",
        what="a turn answered with a `Bash` call (`echo hi`, allowed by `--allowedTools`), "
        "then the request carrying its tool_result",
        prompt="Run echo hi",
        args=("--allowedTools", "Bash(echo hi)"),
        tool_call=ToolCall("Bash", {"command": "echo hi", "description": "Print hi"}),
        main_names=("p-bash-first", "p-bash-result"),
        expected=2,
    ),
    Scenario(
        name="p-toolsearch",
        what="a turn answered with `ToolSearch` `select:TaskCreate,WebFetch`, then the request "
        "carrying its result (`tool_reference` blocks; the selected tools added to `tools`)",
        prompt="Make a task list",
        tool_call=ToolCall("ToolSearch", {"query": "select:TaskCreate,WebFetch"}),
        main_names=("p-toolsearch-first", "p-toolsearch-result"),
        expected=2,
    ),
    Scenario(
        name="p-subagent",
        what="a turn answered with an `Agent` call launching an `Explore` subagent: the "
        "subagent's requests (its own system prompt and tools), then the parent's next turn",
        prompt="Explore this folder",
        tool_call=ToolCall(
            "Agent",
            {
                "description": "List the files",
                "prompt": "List the files here.",
                "subagent_type": "Explore",
            },
        ),
        # The subagent runs in the background: the parent gets its tool_result at once, and a
        # third turn with the subagent's report (a task notification) when it is done.
        main_names=("p-subagent-first", "p-subagent-result", "p-subagent-notified"),
        subagent_label="explore",
        expected=2,
        expected_subagent=1,
    ),
    Scenario(
        name="interactive",
        what=f"an interactive session in a pseudo-terminal (`claude --model {MODEL}`): two "
        "prompts typed, each reply awaited, then `/exit`",
        follow_ups=("Say it again",),
        interactive=True,
        expected=2,
    ),
)


def by_name(name: str) -> Scenario:
    for scenario in SCENARIOS:
        if scenario.name == name:
            return scenario
    raise KeyError(name)


def _header(record: Json, name: str) -> str | None:
    for key, value in record["headers"]:
        if key.lower() == name:
            return str(value)
    return None


def _route(record: Json) -> str:
    return str(record["path"]).split("?")[0].rstrip("/")


def is_subagent_turn(record: Json) -> bool:
    return (
        record["method"] == "POST"
        and _route(record) == "/v1/messages"
        and _header(record, AGENT_HEADER) is not None
    )


def complete(scenario: Scenario, records: list[Json]) -> bool:
    """Whether the records hold every request the scenario is for."""
    main = sum(1 for r in records if is_main_turn(r))
    subagent = sum(1 for r in records if is_subagent_turn(r))
    return main >= scenario.expected and subagent >= scenario.expected_subagent


def is_main_turn(record: Json) -> bool:
    """A Messages request from the session itself (not a subagent's, not a count)."""
    return (
        record["method"] == "POST"
        and _route(record) == "/v1/messages"
        and _header(record, AGENT_HEADER) is None
    )


def file_names(scenario: Scenario, records: list[Json]) -> list[tuple[str, Json]]:
    """Each record with the name of its file (without `.json`), in arrival order."""
    prefix = scenario.name
    counts: dict[str, int] = {}
    named: list[tuple[str, Json]] = []
    for record in sorted(records, key=lambda r: int(r["n"])):
        if is_main_turn(record):
            kind = "main"
        elif is_subagent_turn(record):
            kind = "subagent"
        elif _route(record) == "/v1/messages/count_tokens":
            kind = "count-tokens"
        elif _route(record) == "/v1/models":
            kind = "models"
        else:
            kind = str(record["method"]).lower()  # e.g. a HEAD / connectivity check
        k = counts[kind] = counts.get(kind, 0) + 1
        if kind == "main":
            names = scenario.main_names
            name = names[k - 1] if k <= len(names) else f"{prefix}-{k}"
        elif kind == "subagent":
            label = f"{prefix}-{scenario.subagent_label}"
            name = label if k == 1 else f"{label}-{k}"
        else:
            name = f"{prefix}-{kind}-{k}"
        named.append((name, record))
    return named
