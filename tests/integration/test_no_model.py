"""Without a loadable model the daemon still runs, says why, and answers 503."""

from __future__ import annotations

from pathlib import Path

import anthropic
import pytest

from tests.integration.daemon import start_daemon


def test_missing_model_file_gives_503_with_instructions(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    d = start_daemon(tmp_path, {"model": {"model_path": str(missing)}}, want_status="error")
    try:
        with d.http() as http:
            health = http.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "error"
            assert str(missing) in health.json()["error"]
            r = http.post(
                "/v1/messages",
                json={
                    "model": "m",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["type"] == "api_error"
        assert "model.model_path" in error["message"]
        with pytest.raises(anthropic.InternalServerError) as info:
            d.client().messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.status_code == 503
    finally:
        assert d.stop() == 0
