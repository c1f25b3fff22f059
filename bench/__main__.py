"""Command line of the benchmark: start the targets, run the workloads, write the report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench import agent_edit
from bench import architectures as architectures_bench
from bench import claude_code as claude_code_bench
from bench import grammar as grammar_bench
from bench.report import ratios, table
from bench.targets import (
    InProcess,
    ServerProcess,
    Settings,
    find_llama_server,
    llama_cpp_python_lib_dir,
    llama_server_args,
    start_llama_server,
    start_pensieved,
)
from bench.workloads import run_concurrency, run_decode, run_ttft
from pensieve.paths import bundled_model_path
from pensieved.engine.templates import BUILTIN


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark pensieved against llama-server and in-process llama-cpp-python.",
    )
    parser.add_argument("--model", help="GGUF file (default: the bundled model)")
    parser.add_argument("--llama-server", help="llama-server binary (default: search)")
    parser.add_argument("--no-llama-server", action="store_true", help="skip that column")
    parser.add_argument("--threads", type=int, help="CPU threads for every target")
    parser.add_argument("--slots", type=int, default=4, help="KV slots (parallel sequences)")
    parser.add_argument("--context-size", type=int, default=8192, help="tokens per slot")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--flash-attention", choices=["auto", "on", "off"], default="auto", help="every target"
    )
    parser.add_argument(
        "--kv-cache-type",
        choices=["f16", "q8_0", "q4_0"],
        help="every target's K and V cache (default: f16)",
    )
    parser.add_argument(
        "--kv-unified",
        choices=["auto", "true", "false"],
        default="auto",
        help="pensieved's model.kv_unified (the Claude Code workload always shares)",
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement")
    parser.add_argument(
        "--decode-reps",
        type=int,
        default=9,
        help="repetitions of the decode measurement (a few seconds each, and the noisiest)",
    )
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--prefix-tokens", type=int, default=4500, help="shared system prompt")
    parser.add_argument("--turns", type=int, default=3, help="turns of the warm conversation")
    parser.add_argument("--concurrent-tokens", type=int, default=128)
    parser.add_argument(
        "--concurrency-reps", type=int, default=5, help="repetitions of each concurrent round"
    )
    parser.add_argument("--clients", default="1,2,4", help="concurrent client counts")
    parser.add_argument("--startups", type=int, default=3, help="process starts to time")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run to check the benchmark itself works"
    )
    parser.add_argument(
        "--agent-edit",
        action="store_true",
        help="only the agent-edit workload: speculative decoding where the output copies its "
        "prompt, on pensieved (on, off) and llama-server (none, n-gram --spec-types), with "
        "free prose and 4 clients beside it (--decode-tokens, --reps; --model defaults to "
        "Gemma 3 270M, a base model that copies)",
    )
    parser.add_argument(
        "--llama-spec-types",
        default=",".join(agent_edit.LLAMA_SPEC_TYPES),
        help="llama-server --spec-type values --agent-edit compares (comma-separated)",
    )
    parser.add_argument(
        "--grammar",
        action="store_true",
        help="only the grammar workload: build time and constrained decode rate on the tools "
        "of a captured Claude Code request (--tools)",
    )
    parser.add_argument(
        "--tools",
        default=str(grammar_bench.CLAUDE_CODE_TOOLS),
        help="captured Claude Code request whose body.tools the grammar workload uses",
    )
    parser.add_argument(
        "--claude-code",
        action="store_true",
        help="only the Claude Code workload: sessions on one shared ~20k-token prefix (cold, "
        "turn 2, new session, four at once) and their KV memory, on pensieved per --kv-types "
        "and llama-server unified and not (--request; --context-size defaults to 32768 here)",
    )
    parser.add_argument(
        "--architectures",
        action="store_true",
        help="with --claude-code: turn-N cache reuse and TTFT on a full-attention, a "
        "sliding-window and a hybrid model, against llama-server --ctx-checkpoints default and "
        "0, and Gemma 3's KV memory at 32k (bench/architectures.json)",
    )
    parser.add_argument(
        "--request",
        default=str(claude_code_bench.FIXTURE),
        help="captured Claude Code request the --claude-code workload is built from",
    )
    parser.add_argument(
        "--kv-types", default="f16,q8_0", help="pensieved KV cache types for --claude-code"
    )
    parser.add_argument(
        "--output",
        help="JSON report path (default: bench/results.json, or bench/grammar.json with --grammar)",
    )
    parser.add_argument("--markdown", help="table path (default: next to --output, .md)")
    args = parser.parse_args(argv)
    if args.claude_code and "--context-size" not in (argv if argv is not None else sys.argv):
        args.context_size = 32768
    if args.quick:
        args.reps, args.decode_reps, args.decode_tokens, args.prefix_tokens = 1, 1, 16, 300
        args.concurrency_reps = 1
        args.turns, args.concurrent_tokens, args.clients, args.startups = 2, 8, "1,2", 1
        args.slots, args.context_size = 2, 2048
    if args.output is None and args.agent_edit:
        args.output = "bench/agent_edit.json"
    if args.output is None:
        args.output = (
            "bench/grammar.json"
            if args.grammar
            else "bench/architectures.json"
            if args.claude_code and args.architectures
            else "bench/claude_code.json"
            if args.claude_code
            else "bench/results.json"
        )
    return args


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": psutil.cpu_count(logical=True),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "python": sys.version.split()[0],
        "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
        "load_average_at_start": list(os.getloadavg()),
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = Path(args.model).expanduser() if args.model else bundled_model_path()
    if model is None or not model.is_file():
        print("no model: pass --model PATH or install the bundled model", file=sys.stderr)
        return 2
    threads = args.threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    settings = Settings(
        threads=threads,
        slots=args.slots,
        context_size=args.context_size,
        batch_size=args.batch_size,
        flash_attention=args.flash_attention,
        kv_cache_type=args.kv_cache_type or "f16",
        kv_unified={"true": True, "false": False}.get(args.kv_unified, "auto"),
    )
    if args.agent_edit:
        return agent_edit_main(args, model, settings)
    if args.grammar:
        return grammar_main(args, model, settings)
    if args.claude_code and args.architectures:
        return architectures_main(args, settings)
    if args.claude_code:
        return claude_code_main(args, model, settings)
    report: dict[str, Any] = {
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": {"path": str(model), "size_bytes": model.stat().st_size},
        "settings": {
            **dataclasses.asdict(settings),
            "reps": args.reps,
            "decode_reps": args.decode_reps,
            "concurrency_reps": args.concurrency_reps,
            "quick": args.quick,
        },
        "notes": [],
    }
    binary, why = (None, "skipped (--no-llama-server)")
    if not args.no_llama_server:
        binary, why = find_llama_server(args.llama_server)
    report["llama_server"] = {
        "binary": str(binary) if binary else None,
        "status": why,
        "libraries": str(llama_cpp_python_lib_dir()),
    }
    if binary is None:
        log(f"llama-server column skipped: {why}")
        report["notes"].append(f"llama-server column skipped: {why}")

    servers: list[ServerProcess] = []
    inprocess: InProcess | None = None
    try:
        startup: dict[str, list[float]] = {"pensieved": [], "llama-server": []}
        idle_rss: dict[str, int] = {}
        starters: list[Callable[[], ServerProcess]] = [lambda: start_pensieved(model, settings)]
        if binary is not None:
            starters.append(lambda: start_llama_server(binary, model, settings))
        for i in range(args.startups):
            for start in starters:
                started = start()
                startup[started.name].append(started.ready_s)
                idle_rss[started.name] = started.rss()
                if i == args.startups - 1:
                    servers.append(started)  # the last start-up stays up for the workloads
                else:
                    started.stop()
            log(f"start-up {i}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in startup.items() if v))
        inprocess = InProcess(
            model,
            threads=threads,
            context_size=args.context_size,
            batch_size=args.batch_size,
            flash_attention=args.flash_attention,
        )
        count = inprocess_token_counter(inprocess)

        report["decode"] = run_decode(
            servers, inprocess, tokens=args.decode_tokens, reps=args.decode_reps, log=log
        )
        report["ttft"] = run_ttft(
            servers,
            inprocess,
            prefix_tokens=args.prefix_tokens,
            turns=args.turns,
            reps=args.reps,
            count=count,
            log=log,
        )
        report["concurrency"] = run_concurrency(
            servers,
            client_counts=[int(c) for c in args.clients.split(",")],
            tokens=args.concurrent_tokens,
            reps=args.concurrency_reps,
            log=log,
        )
        status = pensieved_status(servers)
        report["memory"] = memory_report(servers, idle_rss, model, args, status)
        report["pensieved_decode_stats"] = decode_stats(status)
        report["startup_s"] = {
            name: (sorted(v)[len(v) // 2] if v else None) for name, v in startup.items()
        }
        report["startup_runs"] = startup
    finally:
        for server in servers:
            server.stop()
        if inprocess is not None:
            inprocess.close()
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["ratios"] = ratios(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    markdown = Path(args.markdown) if args.markdown else output.with_suffix(".md")
    text = table(report)
    markdown.write_text(text)
    print(text)
    log(f"wrote {output} and {markdown}")
    return 0


def agent_edit_main(args: argparse.Namespace, model: Path, settings: Settings) -> int:
    import llama_cpp

    if not args.model and agent_edit.BASE_MODEL.is_file():
        model = agent_edit.BASE_MODEL
        # A base model's GGUF has no chat template: Gemma's turn markers, the same Jinja on
        # both sides (llama-server continues a final assistant message only with Jinja).
        template = Path(tempfile.mkdtemp(prefix="pensieve-bench-")) / "gemma.jinja"
        template.write_text(BUILTIN["gemma"])
        settings = dataclasses.replace(
            settings,
            pensieved_model=(("chat_template", str(template)),),
            llama_args=("--chat-template-file", str(template)),
        )
    # A sliding-window model's drafts need its whole window cache (docs/speculation.md); both
    # sides keep it, so they do the same work.
    settings = dataclasses.replace(
        settings,
        pensieved_model=(*settings.pensieved_model, ("swa_full", True)),
        llama_args=(*settings.llama_args, "--swa-full"),
    )

    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return list(vocab.tokenize(text.encode(), add_bos=False, special=False))

    starts: dict[str, Callable[[], ServerProcess]] = {}
    commands: dict[str, list[str]] = {}
    for mode in ("auto", "off"):
        spec = dataclasses.replace(settings, speculative=mode)
        starts[f"pensieved speculation {mode}"] = functools.partial(start_pensieved, model, spec)
        keys = ", ".join(
            f"{key}: {value}"
            for key, value in (
                ("speculative", mode),
                ("threads", spec.threads),
                ("slots", spec.slots),
                ("context_size", spec.context_size),
                ("kv_cache_type", spec.kv_cache_type),
                *spec.pensieved_model,
            )
        )
        commands[f"pensieved speculation {mode}"] = [
            "python", "-m", "pensieved", f"(model: {keys})"
        ]  # fmt: skip
    binary, why = (
        (None, "skipped") if args.no_llama_server else find_llama_server(args.llama_server)
    )
    log(f"llama-server: {why}")
    if binary is not None:
        for spec_type in ("", *filter(None, args.llama_spec_types.split(","))):
            extra = ["--spec-type", spec_type] if spec_type else []
            name = f"llama-server {spec_type or 'no speculation'}"
            starts[name] = functools.partial(start_llama_server, binary, model, settings, extra)
            commands[name] = [*llama_server_args(binary, model, 0, settings), *extra]
    report = agent_edit.run(
        starts,
        commands,
        tokenize,
        tokens=args.decode_tokens,
        reps=args.reps,
        pensieved=[name for name in starts if name.startswith("pensieved")],
        log=log,
    )
    vocab.close()
    report = {
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": {"path": str(model), "size_bytes": model.stat().st_size},
        "settings": dataclasses.asdict(settings),
        **report,
    }
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    markdown = Path(args.markdown) if args.markdown else output.with_suffix(".md")
    text = agent_edit.table(report)
    markdown.write_text(text)
    print(text)
    log(f"wrote {output} and {markdown}")
    return 0


def grammar_main(args: argparse.Namespace, model: Path, settings: Settings) -> int:
    host = machine()
    report = grammar_bench.run(
        Path(args.tools),
        model,
        lambda: start_pensieved(model, settings),
        tokens=args.decode_tokens,
        reps=args.decode_reps,
        build_reps=args.reps,
        threads=settings.threads,
        log=log,
    )
    if report is None:
        return 0
    report = {
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": host,
        "model": {"path": str(model), "size_bytes": model.stat().st_size},
        "settings": {**dataclasses.asdict(settings), "reps": args.decode_reps},
        **report,
    }
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    markdown = Path(args.markdown) if args.markdown else output.with_suffix(".md")
    text = grammar_bench.table(report)
    markdown.write_text(text)
    print(text)
    log(f"wrote {output} and {markdown}")
    return 0


def claude_code_main(args: argparse.Namespace, model: Path, settings: Settings) -> int:
    from pensieved.engine.memory import read_shape

    base = claude_code_bench.load_request(Path(args.request))
    if base is None:
        print(f"skipped: no captured Claude Code request at {args.request}", file=sys.stderr)
        return 0
    binary, why = (None, "skipped (--no-llama-server)")
    if not args.no_llama_server:
        binary, why = find_llama_server(args.llama_server)
    report: dict[str, Any] = {
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": {"path": str(model), "size_bytes": model.stat().st_size},
        "settings": {**dataclasses.asdict(settings), "concurrent_tokens": args.concurrent_tokens},
        "request": args.request,
        "llama_server": {
            "binary": str(binary) if binary else None,
            "status": why,
            "libraries": str(llama_cpp_python_lib_dir()),
        },
        "notes": ["one run per target: a cold prefill of the prefix takes minutes on a CPU"],
        "targets": {},
    }
    kv_types = [t for t in args.kv_types.split(",") if t]
    output = Path(args.output)
    markdown = Path(args.markdown) if args.markdown else output.with_suffix(".md")
    for name, side, kind in claude_code_bench.sides(settings, kv_types):
        if kind == "llama-server" and binary is None:
            log(f"{name} skipped: {why}")
            report["notes"].append(f"{name} skipped: {why}")
            continue
        log(f"starting {name}")
        try:
            server = (
                start_pensieved(model, side)
                if kind == "pensieved"
                else start_llama_server(binary, model, side)  # type: ignore[arg-type]
            )
        except RuntimeError as exc:
            report["targets"][name] = {"error": f"did not start: {str(exc)[:300]}"}
            continue
        server.name = name
        try:
            report["targets"][name] = claude_code_bench.run_target(
                server,
                base,
                tokens=args.concurrent_tokens,
                log=log,
                kv_computed=side.context_size
                * side.slots
                * read_shape(model).bytes_per_token(side.kv_cache_type),
            )
        except Exception as exc:  # one target's failure must not lose the others' figures
            log(f"{name} failed: {exc!r}")
            report["targets"][name] = {"error": repr(exc)[:300]}
        finally:
            server.stop()
        # Written after every target: a run of many minutes that is cut short keeps its figures.
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
        report["ratios"] = claude_code_bench.compare(report)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        markdown.write_text(claude_code_bench.table(report))
    print(markdown.read_text() if markdown.exists() else "no target ran")
    log(f"wrote {output} and {markdown}")
    return 0


def architectures_main(args: argparse.Namespace, settings: Settings) -> int:
    from pensieve.paths import cache_dir
    from tests.tiny_models import build

    binary, why = (None, "skipped (--no-llama-server)")
    if not args.no_llama_server:
        binary, why = find_llama_server(args.llama_server)
    if binary is None:
        log(f"llama-server rows skipped: {why}")
    bundled = bundled_model_path()
    gemma = Path(__file__).resolve().parents[1] / ".venv" / "models" / "gemma-3-270m-q4_k_m.gguf"
    if bundled is None or not gemma.is_file():
        print("skipped: the bundled model or Gemma 3 is missing (make install)", file=sys.stderr)
        return 0
    tiny = build(cache_dir() / "bench-models")
    models = {"full": bundled, "swa": gemma, "hybrid": tiny["hybrid"]}
    report: dict[str, Any] = {
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "models": {kind: str(path) for kind, path in models.items()},
        "llama_server": {"binary": str(binary) if binary else None, "status": why},
    }
    machine_line = report["machine"]
    report["preamble"] = (
        f"{machine_line.get('cpu', '')}; one slot of {architectures_bench.CONTEXT} tokens, "
        f"{settings.threads} threads; {architectures_bench.TURNS} turns, one run each (the "
        "machine was shared). llama-server: " + (str(binary) if binary else f"not run ({why})")
    )
    report["results"] = architectures_bench.run(models, settings, binary, log)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    markdown = Path(args.markdown) if args.markdown else output.with_suffix(".md")
    markdown.write_text(architectures_bench.table(report))
    print(markdown.read_text())
    return 0


def pensieved_status(servers: list[ServerProcess]) -> dict[str, Any] | None:
    """pensieved's `status` (over its control socket), if it is one of the targets."""
    from pensieve.client import ControlClient

    for server in servers:
        if server.name == "pensieved" and server.workdir is not None:
            status: dict[str, Any] = ControlClient(server.workdir / "ctl.sock").request(
                "GET", "/v1/status"
            )
            return status
    return None


def decode_stats(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """pensieved's own account of its decode loop (from `status`): time in llama.cpp and in
    Python per batch, over everything the benchmark ran."""
    if status is None:
        return None
    decode: dict[str, Any] = status["model"]["decode"]
    steps = decode["steps"] or 1
    return {
        **decode,
        "llama_ms_per_batch": decode["llama_s"] / steps * 1000,
        "python_us_per_batch": decode["python_s"] / steps * 1e6,
        "tokens_per_batch": decode["tokens"] / steps,
    }


def inprocess_token_counter(inprocess: InProcess) -> Any:
    def count(text: str) -> int:
        return len(inprocess.llm.tokenize(text.encode(), add_bos=False, special=False))

    return count


def memory_report(
    servers: list[ServerProcess],
    idle_rss: dict[str, int],
    model: Path,
    args: argparse.Namespace,
    status: dict[str, Any] | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {"model_file_bytes": model.stat().st_size}
    for server in servers:
        result[server.name] = {
            "rss_idle_after_load_bytes": idle_rss.get(server.name),
            "rss_peak_under_load_bytes": server.peak_rss or None,
            "rss_idle_after_bench_bytes": server.rss(),
        }
    kv = kv_bytes_per_slot(model, args.context_size)
    result["kv_bytes_per_slot"] = kv
    # llama-server (not unified) allocates every slot's context; pensieved allocates what its
    # `status` reports (per slot, or one shared pool).
    result["kv_bytes_total"] = kv * args.slots if kv else None
    if status is not None:
        result["pensieved_kv_bytes"] = int(status["model"]["kv"]["allocated_bytes"])
    return result


def kv_bytes_per_slot(model: Path, context_size: int) -> int:
    """f16 K and V for `context_size` tokens, from the GGUF's shape metadata."""
    from pensieved.engine.model import LoadedModel, ModelSettings

    loaded = LoadedModel(ModelSettings(model, context_size, 0, 1, 64, 1))
    try:
        return loaded.kv_bytes_per_slot()
    finally:
        loaded.close()


if __name__ == "__main__":
    raise SystemExit(main())
