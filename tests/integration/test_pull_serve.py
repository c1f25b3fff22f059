"""A model named by its Hugging Face address in the config: missing until `pensievectl pull`
fetches it (status, models and the 503 say which pull), then served once pulled, from the
Hugging Face cache, to the official SDK. The Hub is the local one of tests/hubserver.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hubserver import FakeHub
from tests.integration.daemon import ctl_status, run_ctl, start_daemon
from tests.pensievectl.test_pull import SMOL, env_for, hub, model_bytes  # noqa: F401

NAME = f"hf:{SMOL}:Q4_1"


def test_a_missing_hf_model_says_which_pull_brings_it_then_serves_once_pulled(
    hub: FakeHub,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "hf"
    for key, value in env_for(hub, cache).items():
        if key.startswith("HF_"):
            monkeypatch.setenv(key, value)
    want = f"missing: run pensievectl pull {SMOL}:Q4_1"
    d = start_daemon(
        tmp_path / "d",
        {"model": {"model_path": NAME, "aliases": {"second-*": NAME}}},
        want_status="error",
    )
    try:
        assert want in (ctl_status(d.config_path).get("error") or "")
        with d.http() as http:
            r = http.post(
                "/v1/messages",
                json={
                    "model": "m",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
        assert r.status_code == 503
        assert want in r.json()["error"]["message"]
        listed = run_ctl("models", socket_path=d.socket_path)
        assert want in listed.stdout, listed.stdout
        # Nothing was fetched at request time.
        assert not [m for m, p, _ in hub.requests if p.startswith(("/api", "/cdn"))]

        # `pull` with no REF fetches what the config names and lacks.
        pulled = run_ctl("pull", config=d.config_path, env=env_for(hub, cache))
        assert pulled.returncode == 0, pulled.stderr
        assert "pulled what the config names" in pulled.stderr
        reloaded = run_ctl("reload", socket_path=d.socket_path)
        assert reloaded.returncode == 0, reloaded.stderr
        d.wait_ready()
        reply = d.client().messages.create(
            model="m",
            max_tokens=8,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert reply.content and reply.content[0].type == "text"
        assert reply.content[0].text.strip()
        status = ctl_status(d.config_path)
        assert str(cache) in str(status), status
    finally:
        assert d.stop() == 0
