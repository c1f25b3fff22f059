"""Writing a capture: one JSON file per request, and a README.md table saying what each is."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.claude_code_capture.scenarios import AGENT_HEADER, Scenario
from tests.claude_code_capture.server import Json


@dataclass(frozen=True)
class Written:
    """A file of the capture and the scenario that made it."""

    name: str
    scenario: Scenario
    record: Json


def write_records(out: Path, scenario: Scenario, named: list[tuple[str, Json]]) -> list[Written]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, record in named:
        (out / f"{name}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        written.append(Written(name, scenario, record))
    return written


def describe(record: Json) -> str:
    """What a request carries, in a few words: its route, tools and system prompt size."""
    path = str(record["path"]).split("?")[0]
    body = record["body"] if isinstance(record["body"], dict) else {}
    parts = [f"`{record['method']} {path}`"]
    if any(name.lower() == AGENT_HEADER for name, _ in record["headers"]):
        parts.append("from the subagent")
    tools = body.get("tools")
    if isinstance(tools, list) and path == "/v1/messages":
        deferred = sum(1 for t in tools if isinstance(t, dict) and t.get("defer_loading"))
        parts.append(f"{len(tools)} tools ({deferred} deferred)")
    system = body.get("system")
    if isinstance(system, list):
        size = sum(len(b.get("text", "")) for b in system if isinstance(b, dict))
        parts.append(f"a {size:,}-character system prompt")
    elif isinstance(system, str):
        parts.append(f"a {len(system):,}-character system prompt")
    if (body.get("output_config") or {}).get("format"):
        parts.append("structured output (`output_config.format`)")
    if messages := body.get("messages"):
        parts.append(f"{len(messages)} messages")
    return ", ".join(parts)


def betas(written: list[Written]) -> list[str]:
    seen: list[str] = []
    for item in written:
        for name, value in item.record["headers"]:
            if name.lower() == "anthropic-beta":
                seen += [b for b in str(value).split(",") if b and b not in seen]
    return seen


def write_readme(out: Path, version: str, written: list[Written], missing: list[str]) -> None:
    lines = [
        f"# Requests captured from the real Claude Code CLI ({version}, npm)",
        "",
        "Each file is one request as Claude Code sent it: `n` (its order within the scenario), "
        "`time`, `client`, `method`, `path` (with its query string), `http_version`, `headers` "
        "(a list of [name, value] in the order sent; API key and connection headers removed), "
        "`body_bytes`, `body`, and `response`: what the capture server answered (`status`, "
        "`sse`, `text` or `tool_use`, and the SSE `events`). Captured by "
        "`python -m tests.claude_code_capture` against its server on 127.0.0.1, offline "
        "(`CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`).",
        "",
    ]
    if seen := betas(written):
        lines += ["`anthropic-beta`: " + ", ".join(f"`{b}`" for b in seen) + ".", ""]
    lines += ["| file | what it is |", "|---|---|"]
    for item in written:
        what = item.scenario.what or item.scenario.name
        lines.append(f"| {item.name} | {what}. This request: {describe(item.record)} |")
    if missing:
        lines += ["", "Not captured: " + "; ".join(missing) + "."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
