"""Speculative decoding against the real daemon: a reply that copies its prompt is the same
with drafts as without, takes fewer decode steps, and status, /metrics and `pensievectl
models` say what speculation earned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pensieve.paths import bundled_model_path
from tests.integration.daemon import (
    EXACT,
    REPO,
    DaemonProcess,
    control_status,
    run_ctl,
    start_daemon,
    wait_for,
    write_config,
)

SOURCE = "\n".join(
    f"    def step_{i}(self, value: int) -> int:\n        return value * {i} + self.offset_{i}"
    for i in range(8)
)
COPY = f"Repeat this code exactly as it is:\n\nclass Steps:\n{SOURCE}\n"
GEMMA = REPO / ".venv" / "models" / "gemma-3-270m-q4_k_m.gguf"


def speculation(daemon: DaemonProcess) -> dict[str, Any]:
    model = control_status(daemon.socket_path)["model"]
    figures: dict[str, Any] = model["decode"]["speculation"]
    return figures


def copy_reply(daemon: DaemonProcess) -> str:
    message = daemon.client(timeout=600).messages.create(
        model="claude-sonnet-4-5",
        max_tokens=80,
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": COPY}],
    )
    block = message.content[0]
    assert block.type == "text"
    return block.text


def test_a_copying_reply_is_the_same_with_drafts_and_takes_fewer_steps(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, EXACT)
    try:
        assert speculation(daemon)["mode"] == "auto"
        drafted = copy_reply(daemon)
        figures = speculation(daemon)
        assert figures["accepted"] > 0 and figures["tokens_per_step"] > 1.0, figures
        assert figures["gained"] == figures["accepted"] + figures["forced"]
        with daemon.http() as http:
            metrics = http.get("/metrics").text
        assert 'pensieve_speculation_accepted{model="SmolLM2-135M-Instruct.Q4_1"}' in metrics
        listing = run_ctl("models", config=daemon.config_path, timeout=30)
        assert listing.returncode == 0, listing.stderr
        assert "speculation: n-gram drafts and jump-forward; " in listing.stdout
        assert "tokens per step" in run_ctl("status", config=daemon.config_path).stdout

        data = json.loads(daemon.config_path.read_text())
        data["model"]["speculative"] = "off"
        write_config(daemon.config_path, data)
        wait_for(lambda: speculation(daemon)["mode"] == "off", 120)
        assert copy_reply(daemon) == drafted
        assert speculation(daemon)["drafted"] == 0
    finally:
        assert daemon.stop() == 0, daemon.log_tail()


def last_reload_error(daemon: DaemonProcess) -> str | None:
    reload: dict[str, Any] | None = control_status(daemon.socket_path)["last_reload"]
    return None if reload is None else reload["error"]


def test_a_draft_model_drafts_for_its_model_and_an_alias_keeps_its_own_setting(
    tmp_path: Path,
) -> None:
    bundled = bundled_model_path()
    assert bundled is not None and GEMMA.is_file(), "`make install` puts both models in place"
    # The bundled model drafting for itself: its drafts are what it samples, so they are
    # kept, on prose the conversation offers nothing to copy from.
    config: dict[str, Any] = {
        "model": {
            **EXACT["model"],
            "speculative": "draft",
            "draft_model_path": str(bundled),
            "aliases": {
                "claude-haiku-*": {
                    "model_path": str(GEMMA),
                    "chat_template": "gemma",
                    "speculative": "off",
                }
            },
        }
    }
    daemon = start_daemon(tmp_path, config)
    try:
        figures = speculation(daemon)
        assert figures["mode"] == "draft"
        assert figures["note"] == f"drafts from {bundled.name} and jump-forward"
        client = daemon.client(timeout=600)
        story = client.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=64,
            extra_body={"temperature": 0},
            messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        )
        assert story.usage.output_tokens == 64
        figures = speculation(daemon)
        assert figures["accepted"] > 0 and figures["tokens_per_step"] > 1.0, figures

        client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=4,
            messages=[{"role": "user", "content": "Hello"}],
        )
        listing = run_ctl("models", config=daemon.config_path, timeout=30)
        assert listing.returncode == 0, listing.stderr
        assert f"{GEMMA.name}: speculation: off" in listing.stdout
        assert f"{bundled.name}: speculation: drafts from {bundled.name}" in listing.stdout

        # A draft model of another family is refused at load, with the reason, and the
        # model loaded before keeps serving.
        data = json.loads(daemon.config_path.read_text())
        data["model"]["draft_model_path"] = str(GEMMA)
        write_config(daemon.config_path, data)
        wait_for(lambda: "cannot draft" in (last_reload_error(daemon) or ""), 120)
        error = last_reload_error(daemon)
        assert f"cannot draft with {GEMMA.name}: its vocabulary has " in str(error), error
        assert speculation(daemon)["note"] == f"drafts from {bundled.name} and jump-forward"
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
