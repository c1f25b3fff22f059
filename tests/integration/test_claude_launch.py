"""`pensievectl claude` against the real daemon: the variables it prints follow the loaded
model's real context and its measured prefill rate, and the real Claude Code CLI started through
it answers (the pinned npm package `make test` installs; PENSIEVE_TEST_CLAUDE names it)."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from pensievectl.claude_env import Daemon, timeouts
from tests.integration.daemon import DaemonProcess, control_status, run_ctl, start_daemon

CONTEXT = 32768
# Small, so a rambling reply ends soon on a CPU; Claude Code is told it (and says it back).
MAX_OUTPUT = 48
KEY = "launch-key"
# Claude Code with no tools sends a prompt of a few thousand tokens: seconds, not minutes.
CLI_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(
        Path(tmp_path_factory.mktemp("claude-launch")),
        {
            "server": {"api_key": KEY},
            "model": {"context_size": CONTEXT, "slots": 1, "max_output_tokens": MAX_OUTPUT},
        },
    )
    yield d
    code = d.stop()
    assert code == 0, f"pensieved exited {code}:\n{d.log_text()}"


def print_env(d: DaemonProcess) -> tuple[dict[str, str], str]:
    result = run_ctl("claude", "--print-env", config=d.config_path)
    assert result.returncode == 0, result
    exports = {}
    for line in result.stdout.splitlines():
        if line.startswith("export "):
            [assignment] = shlex.split(line.removeprefix("export "))
            name, _, value = assignment.partition("=")
            exports[name] = value
    return exports, result.stdout


def test_print_env_shows_the_real_context_and_timeouts_from_the_measured_rate(
    daemon: DaemonProcess,
) -> None:
    model = control_status(daemon.socket_path)["model"]
    assert model["decode"]["prompt_tokens"] == 0
    exports, text = print_env(daemon)
    assert exports["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == str(model["context_size"]) == str(CONTEXT)
    assert exports["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == str(MAX_OUTPUT)
    assert "prefill rate not measured yet" in text
    # The key pensievectl claude gets from the daemon is never what `config show` prints.
    for argv in (("config", "show"), ("config", "show", "--json")):
        shown = run_ctl(*argv, config=daemon.config_path)
        assert shown.returncode == 0 and "**********" in shown.stdout
        assert KEY not in shown.stdout + shown.stderr

    # What it printed reaches the daemon: a wrong key would get 401.
    client = anthropic.Anthropic(
        base_url=exports["ANTHROPIC_BASE_URL"],
        auth_token=exports["ANTHROPIC_AUTH_TOKEN"],
        api_key=None,
        max_retries=0,
    )
    reply = client.messages.create(
        model=exports["ANTHROPIC_DEFAULT_SONNET_MODEL"],
        max_tokens=8,
        messages=[{"role": "user", "content": "Name three colours of the rainbow, please."}],
    )
    assert reply.usage.input_tokens > 0

    decode = control_status(daemon.socket_path)["model"]["decode"]
    # Nothing was cached: every prompt token was evaluated, and timed.
    assert not reply.usage.cache_read_input_tokens
    assert decode["prompt_tokens"] == reply.usage.input_tokens and decode["prompt_s"] > 0
    exports, text = print_env(daemon)
    assert "not measured" not in text
    assert f"measured over {decode['prompt_tokens']} prompt tokens" in text
    derived = timeouts(
        Daemon(
            base_url="",
            api_key=None,
            model_name="",
            model_file="",
            context=CONTEXT,
            max_output_tokens=MAX_OUTPUT,
            prompt_tokens=decode["prompt_tokens"],
            prompt_s=decode["prompt_s"],
        )
    )
    assert exports["API_TIMEOUT_MS"] == str(derived.api_ms)
    assert exports["CLAUDE_STREAM_IDLE_TIMEOUT_MS"] == str(derived.idle_ms)


def _claude_binary() -> str:
    named = os.environ.get("PENSIEVE_TEST_CLAUDE")
    if not named:
        pytest.skip("PENSIEVE_TEST_CLAUDE is not set: `make test` installs the CLI and sets it")
    assert Path(named).exists(), f"{named} is missing: `make claude-code` installs it"
    return named


def run_claude(d: DaemonProcess, home: Path, *claude_args: str) -> tuple[int, str, str]:
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "PENSIEVE_CLAUDE": _claude_binary(),
        "DISABLE_AUTOUPDATER": "1",
    }
    result = run_ctl("claude", *claude_args, config=d.config_path, env=env, timeout=CLI_TIMEOUT_S)
    d.check_alive()
    return result.returncode, result.stdout, result.stderr


@pytest.mark.timeout(CLI_TIMEOUT_S)
def test_claude_code_started_through_it_sees_the_models_context(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    name = Path(control_status(daemon.socket_path)["model"]["path"]).stem
    code, out, err = run_claude(daemon, tmp_path / "home", "-p", "/context", "--tools", "")
    assert code == 0, (out, err)
    # The local model under its own name, with the daemon's context as its window (without
    # pensievectl, Claude Code says "name[1m]" and "/ 1m").
    assert re.search(rf"Model:\*\* {re.escape(name)}\s", out), out
    assert "/ 32.8k" in out, out


@pytest.mark.timeout(CLI_TIMEOUT_S)
def test_claude_code_started_through_it_answers(daemon: DaemonProcess, tmp_path: Path) -> None:
    before = control_status(daemon.socket_path)["requests"]
    code, out, err = run_claude(
        daemon, tmp_path / "home", "-p", "Say hello.", "--tools", "", "--max-turns", "1"
    )
    requests = control_status(daemon.socket_path)["requests"]
    assert requests["served"] > before["served"], (out, err)
    assert requests["tokens_generated"] > before["tokens_generated"], (out, err)
    assert "pensievectl: Claude Code -> pensieved at http://127.0.0.1:" in err
    if code != 0:
        # The one end the CLI reports as its own error after a complete reply: the reply ran
        # into the ceiling pensievectl told it (CLAUDE_CODE_MAX_OUTPUT_TOKENS).
        assert f"exceeded the {MAX_OUTPUT} output token maximum" in out + err, (out, err)
    else:
        assert out.strip(), err
