"""A real third-party OpenAI client end to end: Simon Willison's `llm` CLI from PyPI.

`make test` installs the pinned CLI into its own venv and names its binary in
PENSIEVE_TEST_LLM. It is set up the way its users set up any OpenAI-compatible server: an
`extra-openai-models.yaml` in its user directory (a temporary LLM_USER_PATH here) pointing
`api_base` at the daemon. It needs nothing beyond localhost.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.integration.daemon import DaemonProcess, control_status, start_daemon

# A slow CPU (or one shared with other work) still answers a short prompt in this time.
RUN_S = 240
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "boolean"}},
    "required": ["answer"],
}


def _llm_binary() -> Path:
    named = os.environ.get("PENSIEVE_TEST_LLM")
    if not named:
        pytest.skip("PENSIEVE_TEST_LLM is not set: `make test` installs the CLI and sets it")
    binary = Path(named)
    assert binary.exists(), f"{binary} is missing: `make llm-cli` installs it"
    return binary


@pytest.fixture(scope="module")
def llm_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(Path(tmp_path_factory.mktemp("llm-cli")))
    yield d
    code = d.stop()
    assert code == 0, f"pensieved exited {code}:\n{d.log_text()}"


@pytest.fixture
def llm(llm_daemon: DaemonProcess, tmp_path: Path) -> Any:
    binary = _llm_binary()
    user_dir = tmp_path / "llm"
    user_dir.mkdir()
    # What a user writes to point llm at pensieved (docs/openai.md's lines).
    (user_dir / "extra-openai-models.yaml").write_text(
        "- model_id: pensieve\n"
        "  model_name: smollm2\n"
        f"  api_base: {llm_daemon.base_url}/v1\n"
        "  supports_schema: true\n"
        "  supports_tools: true\n"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "LLM_USER_PATH": str(user_dir),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(binary), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_S,
            check=False,
        )
        llm_daemon.check_alive()
        return result

    return run


@pytest.mark.timeout(2 * RUN_S)
def test_llm_streams_a_reply_and_logs_its_usage(llm: Any, llm_daemon: DaemonProcess) -> None:
    before = control_status(llm_daemon.socket_path)["requests"]
    result = llm("-m", "pensieve", "Say hello.", "-o", "max_tokens", "12")
    assert result.returncode == 0, result
    assert result.stdout.strip(), result
    requests = control_status(llm_daemon.socket_path)["requests"]
    assert requests["served"] == before["served"] + 1
    assert requests["tokens_generated"] > before["tokens_generated"]
    # llm keeps the reply and the usage it parsed from the stream's last chunk.
    logged = llm("logs", "-n", "1", "--json")
    assert logged.returncode == 0, logged
    entry = json.loads(logged.stdout)[0]
    assert entry["response"].strip() == result.stdout.strip()
    assert 0 < entry["output_tokens"] <= 12
    assert entry["input_tokens"] > 0


@pytest.mark.timeout(2 * RUN_S)
def test_llm_schema_output_validates(llm: Any) -> None:
    result = llm(
        "-m",
        "pensieve",
        "--no-stream",
        "--schema",
        json.dumps(VERDICT_SCHEMA),
        "Is the sky blue?",
        "-o",
        "max_tokens",
        "40",
    )
    assert result.returncode == 0, result
    jsonschema.validate(json.loads(result.stdout), VERDICT_SCHEMA)
