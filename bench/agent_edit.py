"""The agent-edit workload: speculative decoding where the output copies, and where not.

An agent's edits copy: an Edit's old_string is lines a Read put in the context. Here the
model is given a source file of about 3k tokens and asked to repeat it, its reply already
started with the file's first lines (an assistant prefill, as an agent that quotes does), so a
model that copies at all copies most of its output. Each figure is printed beside its *copy
share*: the fraction of output tokens that continue a 12-gram found earlier in the prompt or
the output. Targets, side by side in one
run with the same GGUF, threads and kernels: pensieved with speculation on and off,
llama-server without speculation and with its n-gram `--spec-type`s. Beside that, what
speculation costs where nothing is copied: free prose, one client and four at once.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.targets import ServerProcess, stream_chat, stream_message
from bench.workloads import body, decode_rate, median, story_prompt

COPY_GRAM = 12
SOURCE = Path(__file__).resolve().parent.parent / "pensieved" / "engine" / "memory.py"
PREFILL_LINES = 3
# A base model copies what it has seen; the bundled instruct model paraphrases and repeats
# itself after a few lines (29 % copy share), which would measure nothing.
BASE_MODEL = (
    Path(__file__).resolve().parent.parent / ".venv" / "models" / "gemma-3-270m-q4_k_m.gguf"
)
# llama-server's n-gram kinds compared (its default is none).
LLAMA_SPEC_TYPES = ("ngram-mod", "ngram-simple", "ngram-map-k")


def copy_messages() -> list[dict[str, str]]:
    """The user's request and the reply's start: the file's first lines, in a code fence."""
    source = SOURCE.read_text()
    start = "".join(source.splitlines(keepends=True)[:PREFILL_LINES])
    return [
        {
            "role": "user",
            "content": f"Repeat this file exactly as it is.\n\n```python\n{source}```",
        },
        {"role": "assistant", "content": f"```python\n{start}"},
    ]


def copy_share(context: Sequence[int], output: Sequence[int], n: int = COPY_GRAM) -> float:
    """Output tokens continuing an n-gram (n tokens ending at them) seen earlier."""
    sequence = list(context) + list(output)
    seen: set[tuple[int, ...]] = set()
    start = len(context)
    copied = 0
    for end in range(n, len(sequence) + 1):
        gram = tuple(sequence[end - n : end])
        if end > start and gram in seen:
            copied += 1
        seen.add(gram)
    return copied / len(output) if output else 0.0


def one_rate(
    server: ServerProcess, messages: list[dict[str, str]], tokens: int
) -> tuple[float | None, str]:
    # Chat Completions: llama-server continues a final assistant message only there.
    prefill = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    result = stream_chat(server.port, body(messages, tokens), echo=prefill)
    return decode_rate(result), result.text


def four_clients(server: ServerProcess, tokens: int) -> float:
    def one(i: int) -> int:
        prompt = story_prompt(("dragon", "robot", "sailing ship", "lighthouse keeper")[i])
        return stream_message(
            server.port, body([{"role": "user", "content": prompt}], tokens)
        ).output_tokens

    import time

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        total = sum(pool.map(one, range(4)))
    return total / (time.perf_counter() - started)


def run(
    starts: dict[str, Callable[[], ServerProcess]],
    command_lines: dict[str, list[str]],
    tokenize: Callable[[str], list[int]],
    *,
    tokens: int,
    reps: int,
    pensieved: Sequence[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every target started first, then measured in turn, one request at a time, each round
    over all of them: a shared machine's load then weighs on every target alike, not on
    whichever happened to run while another job did."""
    messages = copy_messages()
    context = tokenize("".join(m["content"] for m in messages))
    servers: dict[str, ServerProcess] = {}
    rates: dict[str, list[float]] = {name: [] for name in starts}
    shares: dict[str, list[float]] = {name: [] for name in starts}
    texts: dict[str, list[str]] = {name: [] for name in starts}
    prose: dict[str, list[float]] = {name: [] for name in pensieved}
    four: dict[str, list[float]] = {name: [] for name in pensieved}
    story = [{"role": "user", "content": story_prompt()}]
    try:
        for name, start in starts.items():
            log(f"agent-edit: starting {name}")
            servers[name] = start()
        for rep in range(reps):
            log(f"agent-edit: round {rep + 1} of {reps}")
            for name, server in servers.items():
                rate, text = one_rate(server, messages, tokens)
                if rate is not None:
                    rates[name].append(rate)
                shares[name].append(copy_share(context, tokenize(text)))
                texts[name].append(text)
                if name in prose:
                    prose_rate, _ = one_rate(server, story, tokens)
                    if prose_rate is not None:
                        prose[name].append(prose_rate)
                    four[name].append(four_clients(server, tokens // 2))
    finally:
        for server in servers.values():
            server.stop()
    rows: dict[str, Any] = {}
    for name in starts:
        row: dict[str, Any] = {
            "command": shlex.join(command_lines.get(name, [])),
            "copy_tokens_per_s": median(rates[name]),
            "copy_share": median(shares[name]),
            "runs": rates[name],
            "text": texts[name][0] if texts[name] else "",
        }
        if name in prose:
            row["prose_tokens_per_s"] = median(prose[name])
            row["four_clients_tokens_per_s"] = median(four[name])
        rows[name] = row
    return {"max_tokens": tokens, "reps": reps, "source": SOURCE.name, "targets": rows}


def same(text: str | None, reference: str | None) -> str:
    """Whether a target's reply is pensieved's without speculation, word for word."""
    if text is None or reference is None:
        return "-"
    return "yes" if text == reference else "no"


def table(report: dict[str, Any]) -> str:
    rows = report["targets"]
    lines = [
        f"# agent-edit: repeat {report['source']} ({report['max_tokens']} greedy tokens, "
        f"median of {report['reps']})",
        "",
        "| target | copy tok/s | copy share | same reply | prose tok/s | 4 clients tok/s |",
        "| --- | ---: | ---: | :---: | ---: | ---: |",
    ]
    # Greedy replies to the same prompt: every target should write the same one.
    reference = rows.get("pensieved speculation off", {}).get("text")

    def fmt(value: float | None, pattern: str = "{:.1f}") -> str:
        return "-" if value is None else pattern.format(value)

    for name, row in rows.items():
        lines.append(
            f"| {name} | {fmt(row['copy_tokens_per_s'])} | {fmt(row['copy_share'], '{:.0%}')} | "
            f"{same(row.get('text'), reference)} | {fmt(row.get('prose_tokens_per_s'))} | "
            f"{fmt(row.get('four_clients_tokens_per_s'))} |"
        )
    on, off = rows.get("pensieved speculation auto"), rows.get("pensieved speculation off")
    if on and off:
        lines.append("")
        for key, what in (
            ("copy_tokens_per_s", "copying"),
            ("prose_tokens_per_s", "free prose"),
            ("four_clients_tokens_per_s", "4 clients"),
        ):
            if on.get(key) and off.get(key):
                lines.append(f"- speculation on / off, {what}: {on[key] / off[key]:.2f}x")
        for name, row in rows.items():
            if name.startswith("llama-server") and row["copy_tokens_per_s"]:
                ratio = on["copy_tokens_per_s"] / row["copy_tokens_per_s"]
                lines.append(f"- pensieved (speculation on) / {name}, copying: {ratio:.2f}x")
    lines.append("")
    lines.append("Command lines:")
    lines.append("")
    for name, row in rows.items():
        if row["command"]:
            lines.append(f"- {name}: `{row['command']}`")
    return "\n".join(lines) + "\n"
