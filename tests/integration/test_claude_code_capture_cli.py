"""The capture command with the real Claude Code CLI (PENSIEVE_TEST_CLAUDE, which `make test`
installs): one scenario end to end, written in the corpus's format."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.claude_code_capture.__main__ import main
from tests.test_claude_code_capture import RECORD_KEYS


@pytest.mark.timeout(300)
def test_the_real_cli_s_tool_round_trip_is_captured(tmp_path: Path) -> None:
    named = os.environ.get("PENSIEVE_TEST_CLAUDE")
    if not named:
        pytest.skip("PENSIEVE_TEST_CLAUDE is not set: `make test` installs the CLI and sets it")
    claude = Path(named)
    assert claude.exists(), f"{claude} is missing: `make claude-code` installs it"
    version = subprocess.run(
        [str(claude), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    out = tmp_path / "capture"

    code = main(
        ["--version", version, "--out", str(out), "--claude", str(claude), "--scenario", "p-bash"]
    )

    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "p-bash-first.json", "p-bash-result.json"} <= names, names
    for extra in names - {"README.md", "p-bash-first.json", "p-bash-result.json"}:
        # Only requests outside the Messages API, such as 2.1.197's HEAD / connectivity check.
        assert not json.loads((out / extra).read_text())["path"].startswith("/v1/messages"), extra
    first = json.loads((out / "p-bash-first.json").read_text())
    result = json.loads((out / "p-bash-result.json").read_text())
    for record in (first, result):
        assert list(record) == RECORD_KEYS
        assert all(name.lower() != "x-api-key" for name, _ in record["headers"])
        assert ["User-Agent", f"claude-cli/{version} (external, sdk-cli)"] in record["headers"]
    call = first["response"]["tool_use"]
    assert call["name"] == "Bash"
    (block,) = [b for b in result["body"]["messages"][-1]["content"] if b["type"] == "tool_result"]
    assert block["tool_use_id"] == call["id"]
    # The CLI ran the command: its output, not a refusal, came back.
    content = block["content"]
    text = content if isinstance(content, str) else content[0]["text"]
    assert text.startswith("hi") and not block.get("is_error"), block
    readme = (out / "README.md").read_text()
    assert "| p-bash-first |" in readme and "| p-bash-result |" in readme
