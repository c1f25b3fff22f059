"""Context checkpoints on the real daemon: models whose cache cannot be cut back keep their
prefix across turns, between slots, across a restart and an idle unload.

Three models, one daemon each for the module: a tiny hybrid (LFM2) and a tiny recurrent model
(Mamba) with random weights (tests/tiny_models.py), and Gemma 3 270M with the small
sliding-window cache. Their replies are noise to people; the tokens read from the cache are
exact. Each conversation's next turn carries the previous reply in another form than the tokens
generated (as Claude Code drops the thinking): the prompt leaves the slot's cache where the
reply starts, the case only a checkpoint serves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.integration.daemon import (
    REPO,
    DaemonProcess,
    control_status,
    prompt_tokens,
    run_ctl,
    start_daemon,
    wait_for,
    write_config,
)
from tests.tiny_models import build

GEMMA = REPO / ".venv" / "models" / "gemma-3-270m-q4_k_m.gguf"
# About 1,500 tokens: an agent's system prompt in small (and over the 512 saved at unload).
SYSTEM = " ".join(
    f"Rule {i}: keep the project's files tidy and explain every change you make." for i in range(90)
)
MODEL = "claude-sonnet-4-5"

EXPECTED = {
    "hybrid": ("hybrid recurrent + attention", "recurrent-checkpoints"),
    "recurrent": ("recurrent", "recurrent-checkpoints"),
    "gemma": ("sliding-window attention (window 512)", "swa-checkpoints"),
}


@dataclass
class Served:
    """One model's daemon, restartable, and the conversation the tests carry on."""

    name: str
    tmp: Path
    config: dict[str, Any]
    daemon: DaemonProcess
    turns: list[dict[str, Any]] = field(default_factory=list)

    def client(self) -> anthropic.Anthropic:
        return self.daemon.client(timeout=600)

    def restart(self) -> None:
        assert self.daemon.stop() == 0, self.daemon.log_text()
        self.daemon = start_daemon(self.tmp, self.config)

    def status(self) -> dict[str, Any]:
        return control_status(self.daemon.socket_path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    built = build(tmp_path_factory.mktemp("tiny-models"))
    assert GEMMA.is_file(), f"{GEMMA} is missing: `make install` assembles it"
    return {**built, "gemma": GEMMA}


@pytest.fixture(scope="module", params=["hybrid", "recurrent", "gemma"])
def served(
    request: pytest.FixtureRequest,
    models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    name: str = request.param
    model: dict[str, Any] = {
        "model_path": str(models[name]),
        "context_size": 4096,
        "slots": 2,
        "swa_full": False,
    }
    if name == "gemma":
        model["chat_template"] = "gemma"  # a base model: no template of its own
    tmp = tmp_path_factory.mktemp(f"ckpt-{name}")
    config = {"model": model}
    state = Served(name, tmp, config, start_daemon(tmp, config))
    yield state
    assert state.daemon.stop() == 0, state.daemon.log_text()


def turn(served: Served, question: str) -> tuple[int, int]:
    """Ask the conversation's next question; (tokens read from the cache, prompt tokens)."""
    messages = [*served.turns, {"role": "user", "content": question}]
    # Greedy: a sampled reply is now and then empty (the end of turn first), and then the
    # next prompt extends this one, with nothing to diverge from.
    reply = served.client().messages.create(
        model=MODEL,
        max_tokens=12,
        system=SYSTEM,
        messages=messages,
        extra_body={"temperature": 0},
    )
    assert reply.usage.output_tokens > 0, reply
    # The client keeps the reply in a form of its own (as Claude Code drops the thinking): the
    # next prompt leaves the slot's cache where the reply starts. A digest, because the model
    # learns any plainer form from the turns before and writes it itself.
    digest = hashlib.sha256(question.encode()).hexdigest()[:12]
    kept = f"(reply {len(served.turns) // 2 + 1} as the client keeps it: {digest})"
    served.turns = [*messages, {"role": "assistant", "content": kept}]
    return reply.usage.cache_read_input_tokens or 0, prompt_tokens(reply.usage)


def last_report(served: Served) -> dict[str, Any]:
    report: dict[str, Any] = served.status()["model"]["recent_requests"][-1]
    return report


def kv(served: Served) -> dict[str, Any]:
    result: dict[str, Any] = served.status()["model"]["kv"]
    return result


def test_the_architecture_and_strategy_are_shown(served: Served) -> None:
    status = kv(served)
    assert (status["architecture"], status["cache_strategy"]) == EXPECTED[served.name]
    # None of these memories can drop a rejected draft: no drafts, only jump-forward.
    speculation = served.status()["model"]["decode"]["speculation"]
    assert speculation["note"].startswith("jump-forward only"), speculation
    shown = run_ctl("models", config=served.daemon.config_path)
    assert shown.returncode == 0, shown.stderr
    assert "{}: {}".format(*EXPECTED[served.name]) in shown.stdout
    shown = run_ctl("status", config=served.daemon.config_path)
    assert f"cache strategy {EXPECTED[served.name][1]}" in shown.stdout, shown.stdout


def test_turn_two_reads_its_prefix_from_a_checkpoint(served: Served) -> None:
    read, prompt = turn(served, "Which file should I edit first?")
    assert read == 0 and prompt > 1000
    slots = [s for s in kv(served)["slots"] if s["tokens"]]
    held = slots[0]["checkpoints"]
    assert held["count"] >= 2 and held["bytes"] > 0
    assert max(held["positions"]) == prompt  # the end of the prompt, before the reply

    for question in ("And then?", "Why that one?"):
        read, prompt = turn(served, question)
        assert read >= 0.95 * prompt, (read, prompt)
        report = last_report(served)
        assert report["diverged_at"] is not None and read <= report["diverged_at"], report


def test_a_second_session_takes_the_shared_prefix_from_the_other_slot(served: Served) -> None:
    before = [s["tokens"] for s in kv(served)["slots"]]
    reply = served.client().messages.create(
        model=MODEL,
        max_tokens=4,
        system=SYSTEM,
        messages=[{"role": "user", "content": "A different question: where are the tests?"}],
    )
    read, prompt = reply.usage.cache_read_input_tokens or 0, prompt_tokens(reply.usage)
    assert read >= 0.9 * prompt, (read, prompt)
    after = [s["tokens"] for s in kv(served)["slots"]]
    assert all(after) and after[before.index(max(before))] == max(before), (before, after)
    report = last_report(served)
    assert report["source"].startswith("slot"), report


def test_checkpoints_are_read_back_after_a_restart(served: Served) -> None:
    served.restart()
    status = kv(served)
    restored = [s for s in status["slots"] if s["checkpoints"]["count"]]
    assert restored, status["slots"]
    read, prompt = turn(served, "Restarted: go on.")
    assert read >= 0.95 * prompt, (read, prompt)
    assert "restored from disk" in last_report(served)["source"]


def test_checkpoints_are_read_back_after_an_idle_unload(served: Served) -> None:
    config = json.loads(served.daemon.config_path.read_text())
    config["model"]["idle_unload_s"] = 1.0
    write_config(served.daemon.config_path, config)
    try:
        wait_for(lambda: served.status()["model"] is None, 60)
        read, prompt = turn(served, "Back from idle: go on.")
        assert read >= 0.95 * prompt, (read, prompt)
        assert "restored from disk" in last_report(served)["source"]
    finally:
        config["model"].pop("idle_unload_s")
        write_config(served.daemon.config_path, config)
