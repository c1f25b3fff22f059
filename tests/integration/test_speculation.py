"""Speculative decoding against the real daemon: a reply that copies its prompt is the same
with drafts as without, takes fewer decode steps, and status, /metrics and `pensievectl
models` say what speculation earned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.integration.daemon import (
    EXACT,
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
