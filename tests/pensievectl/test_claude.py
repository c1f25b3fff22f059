"""`pensievectl claude`: the variables it derives from a daemon's replies, its command line,
settings.json, and what it hands to the client (the daemon side is in
tests/integration/test_claude_launch.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pensieve.exitcodes import CtlExit
from pensieve.wire import ModelActionResponse, StatusResponse
from pensievectl import cli
from pensievectl.claude import find_claude, split_passthrough, write_settings
from pensievectl.claude_env import (
    API_TIMEOUT_FLOOR_MS,
    IDLE_TIMEOUT_CAP_MS,
    IDLE_TIMEOUT_FLOOR_MS,
    NO_KEY_TOKEN,
    Daemon,
    claude_env,
    required_context,
    shell_exports,
    timeouts,
)
from pensievectl.context import CommandContext
from pensievectl.errors import (
    ClaudeNotFoundError,
    ContextTooSmallError,
    SettingsFileError,
)


def daemon(**changes: Any) -> Daemon:
    fields: dict[str, Any] = {
        "base_url": "http://127.0.0.1:8080",
        "api_key": None,
        "model_name": "Qwen3 8B",
        "model_file": "Qwen3-8B-Q4_K_M.gguf",
        "context": 40_960,
        "max_output_tokens": 8192,
        "prompt_tokens": 1000,
        "prompt_s": 2.0,
    }
    return Daemon(**(fields | changes))


# ---- the variables ------------------------------------------------------------------------


def test_every_variable_follows_the_daemon_and_its_model() -> None:
    env = claude_env(daemon(api_key="s3cret"))
    assert env.variables == {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8080",
        "ANTHROPIC_AUTH_TOKEN": "s3cret",
        "ANTHROPIC_DEFAULT_OPUS_MODEL": "Qwen3-8B-Q4_K_M",
        "ANTHROPIC_DEFAULT_SONNET_MODEL": "Qwen3-8B-Q4_K_M",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "Qwen3-8B-Q4_K_M",
        "ANTHROPIC_CUSTOM_MODEL_OPTION": "Qwen3-8B-Q4_K_M",
        "ANTHROPIC_CUSTOM_MODEL_OPTION_NAME": "Qwen3 8B",
        "ANTHROPIC_CUSTOM_MODEL_OPTION_DESCRIPTION": (
            "Qwen3-8B-Q4_K_M.gguf on pensieved, 40960 tokens of context"
        ),
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": "40960",
        "CLAUDE_CODE_DISABLE_1M_CONTEXT": "1",
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "8192",
        "API_TIMEOUT_MS": str(API_TIMEOUT_FLOOR_MS),
        "CLAUDE_STREAM_IDLE_TIMEOUT_MS": str(IDLE_TIMEOUT_FLOOR_MS),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    # Below Claude Code's minimum the compaction window is left out, and why is said.
    assert any("CLAUDE_CODE_AUTO_COMPACT_WINDOW is left out" in n for n in env.notes)


def test_a_daemon_without_a_key_gets_a_placeholder_token() -> None:
    env = claude_env(daemon())
    assert env.variables["ANTHROPIC_AUTH_TOKEN"] == NO_KEY_TOKEN
    assert any("no API key" in note for note in env.notes)


def test_a_large_context_also_sets_the_compaction_window() -> None:
    env = claude_env(daemon(context=131_072))
    assert env.variables["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "131072"
    assert env.variables["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "131072"
    assert not any("AUTO_COMPACT" in note for note in env.notes)


def test_timeouts_follow_the_measured_prefill_rate() -> None:
    # 100 tokens/s: the 20k prefix takes 200 s, three times that is 600 s.
    limits = timeouts(daemon(prompt_tokens=5000, prompt_s=50.0))
    assert (limits.idle_ms, limits.api_ms) == (600_000, 1_200_000)
    assert "100 tokens/s, measured over 5000 prompt tokens" in limits.note
    assert "about 200 s cold" in limits.note
    # A fast model never gets less than Claude Code's own defaults.
    fast = timeouts(daemon(prompt_tokens=10_000, prompt_s=1.0))
    assert (fast.idle_ms, fast.api_ms) == (IDLE_TIMEOUT_FLOOR_MS, API_TIMEOUT_FLOOR_MS)
    # A very slow one: the idle timeout stops at Claude Code's limit, and that is said.
    slow = timeouts(daemon(prompt_tokens=100, prompt_s=10.0))
    assert slow.idle_ms == IDLE_TIMEOUT_CAP_MS and slow.api_ms == 12_000_000
    assert "Claude Code's limit of 30 minutes" in slow.note


def test_before_any_prefill_the_rate_is_an_assumed_one_and_says_so() -> None:
    limits = timeouts(daemon(prompt_tokens=0, prompt_s=0.0))
    assert "not measured yet" in limits.note and "assuming 25 tokens/s" in limits.note
    # 25 tokens/s: 800 s for the prefix, 2,400 s with the margin.
    assert (limits.idle_ms, limits.api_ms) == (IDLE_TIMEOUT_CAP_MS, 4_800_000)


def test_a_context_too_small_for_claude_code_is_refused_with_the_settings_to_change() -> None:
    small = daemon(model_file="SmolLM2.gguf", context=8192)
    with pytest.raises(ContextTooSmallError) as caught:
        claude_env(small)
    message = str(caught.value)
    assert "SmolLM2.gguf has a context of 8192 tokens" in message
    assert f"needs at least {required_context(small)}" in message
    for setting in ("model.context_size", "model.memory_budget_mb", "model.max_output_tokens"):
        assert setting in message
    # The reply's share counts: the same context with a smaller ceiling is enough.
    assert claude_env(daemon(context=32_768, max_output_tokens=4096)).variables


def test_families_a_pattern_routes_elsewhere_are_left_to_it() -> None:
    d = daemon(
        aliases=("claude-haiku-*", "opus-local"),
        upstreams=("claude-sonnet-*",),
    )
    env = claude_env(d)
    assert env.variables["ANTHROPIC_DEFAULT_OPUS_MODEL"] == "opus-local"
    assert "ANTHROPIC_DEFAULT_SONNET_MODEL" not in env.variables
    assert "ANTHROPIC_DEFAULT_HAIKU_MODEL" not in env.variables
    assert sum("Claude Code's own model name is used" in n for n in env.notes) == 2


def test_the_local_name_is_one_no_pattern_takes() -> None:
    env = claude_env(daemon(model_file="qwen.gguf", aliases=("qwen*",)))
    assert env.variables["ANTHROPIC_CUSTOM_MODEL_OPTION"] == "pensieve-local"
    assert env.variables["ANTHROPIC_DEFAULT_SONNET_MODEL"] == "pensieve-local"


def test_shell_exports_give_back_every_value_exactly() -> None:
    env = claude_env(daemon(model_name='it\'s a "model" $HOME `x`', api_key="k y"))
    script = shell_exports(env, "header")
    assert script.startswith("# header\n")
    names = list(env.variables)
    shown = subprocess.run(
        ["sh", "-c", script + "\n" + "".join(f'printf "%s\\0" "${n}"\n' for n in names)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
    ).stdout.split("\0")[:-1]
    assert dict(zip(names, shown, strict=True)) == env.variables


# ---- settings.json ------------------------------------------------------------------------


def test_settings_keep_other_keys_and_drop_stale_variables_of_ours(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text(
        json.dumps(
            {
                "model": "opus",
                "env": {
                    "MY_VAR": "kept",
                    "ANTHROPIC_BASE_URL": "http://old:1",
                    "CLAUDE_CODE_AUTO_COMPACT_WINDOW": "200000",
                },
                "permissions": {"allow": ["Bash(ls)"]},
            }
        )
    )
    path.chmod(0o640)
    variables = claude_env(daemon()).variables
    write_settings(path, variables)
    data = json.loads(path.read_text())
    assert list(data) == ["model", "env", "permissions"]
    assert data["model"] == "opus" and data["permissions"] == {"allow": ["Bash(ls)"]}
    assert data["env"] == {"MY_VAR": "kept", **variables}
    assert list(data["env"])[:2] == ["MY_VAR", "ANTHROPIC_BASE_URL"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_a_new_settings_file_is_private_and_its_folder_made(tmp_path: Path) -> None:
    path = tmp_path / ".claude" / "settings.json"
    write_settings(path, {"ANTHROPIC_BASE_URL": "http://127.0.0.1:8080"})
    assert json.loads(path.read_text()) == {"env": {"ANTHROPIC_BASE_URL": "http://127.0.0.1:8080"}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_symlinked_settings_file_is_written_through(tmp_path: Path) -> None:
    target = tmp_path / "dotfiles" / "settings.json"
    target.parent.mkdir()
    target.write_text('{"theme": "dark"}')
    link = tmp_path / "settings.json"
    link.symlink_to(target)
    write_settings(link, {"ANTHROPIC_BASE_URL": "http://127.0.0.1:8080"})
    assert link.is_symlink()
    assert json.loads(target.read_text())["theme"] == "dark"
    assert json.loads(target.read_text())["env"] == {"ANTHROPIC_BASE_URL": "http://127.0.0.1:8080"}


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('{"env": {', "is not valid JSON (line 1)"),
        ("[1, 2]", "holds no JSON object"),
        ('{"env": "x"}', "`env` is not an object"),
    ],
)
def test_a_broken_settings_file_is_left_alone(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "settings.json"
    path.write_text(text)
    with pytest.raises(SettingsFileError) as caught:
        write_settings(path, {"ANTHROPIC_BASE_URL": "http://127.0.0.1:8080"})
    assert said in str(caught.value) and str(path) in str(caught.value)
    assert path.read_text() == text


# ---- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "ours", "theirs"),
    [
        (["claude"], ["claude"], []),
        (["claude", "-p", "hi", "--model", "x"], ["claude"], ["-p", "hi", "--model", "x"]),
        (["--socket", "/s", "claude", "--print-env"], ["--socket", "/s", "claude", "--print-env"],
         []),
        (["claude", "--settings"], ["claude", "--settings"], []),
        (["claude", "--settings", "f.json"], ["claude", "--settings", "f.json"], []),
        (["claude", "--claude", "/bin/c", "-c"], ["claude", "--claude", "/bin/c"], ["-c"]),
        (["claude", "--claude=/bin/c", "--", "--settings", "s"], ["claude", "--claude=/bin/c"],
         ["--settings", "s"]),
        # Claude Code's --print is not an abbreviation of ours.
        (["claude", "--print", "hi"], ["claude"], ["--print", "hi"]),
        (["claude", "-p", "--print-env"], ["claude"], ["-p", "--print-env"]),
    ],
)  # fmt: skip
def test_claude_code_arguments_pass_through_verbatim(
    argv: list[str], ours: list[str], theirs: list[str]
) -> None:
    assert split_passthrough(argv) == (ours, theirs)


def test_other_commands_are_not_split() -> None:
    assert split_passthrough(["--config", "claude", "status"]) == (
        ["--config", "claude", "status"],
        None,
    )


def test_print_env_takes_no_claude_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["claude", "--print-env", "-p", "hi"])
    assert caught.value.code == CtlExit.USAGE
    assert "take no CLAUDE ARGS (got -p hi)" in capsys.readouterr().err


def executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_no_claude_on_path_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("PENSIEVE_CLAUDE", raising=False)
    # The daemon is not asked (there is none at this socket): the client comes first.
    code = cli.main(["--socket", str(tmp_path / "none.sock"), "claude", "-p", "hi"])
    assert code == CtlExit.FAILURE
    err = capsys.readouterr().err
    assert "no `claude` on PATH" in err
    assert "npm install -g @anthropic-ai/claude-code" in err


def test_the_binary_can_be_named(tmp_path: Path) -> None:
    binary = executable(tmp_path / "claude-2.1.332")
    assert find_claude(str(binary), {"PATH": ""}) == str(binary)
    assert find_claude(None, {"PATH": "", "PENSIEVE_CLAUDE": str(binary)}) == str(binary)
    (tmp_path / "bin").mkdir()
    on_path = executable(tmp_path / "bin" / "claude")
    search = str(tmp_path / "x") + os.pathsep + str(tmp_path / "bin")
    assert find_claude(None, {"PATH": search}) == str(on_path)
    with pytest.raises(ClaudeNotFoundError, match=r"\(\$PENSIEVE_CLAUDE\) is not an executable"):
        find_claude(None, {"PATH": "", "PENSIEVE_CLAUDE": str(tmp_path / "missing")})


# ---- against a daemon's replies -----------------------------------------------------------


def model_status(context: int = 40_960, prompt_tokens: int = 5000) -> dict[str, Any]:
    return {
        "name": "Qwen3 8B",
        "path": "/m/Qwen3-8B-Q4_K_M.gguf",
        "size_bytes": 5_000_000_000,
        "context_size": context,
        "gpu_layers": 0,
        "threads": 2,
        "slots": 2,
        "kv_bytes_per_slot": 1,
        "cached_tokens": [0, 0],
        "decode": {
            "steps": 10,
            "tokens": prompt_tokens + 10,
            "llama_s": 51.0,
            "python_s": 0.1,
            "prompt_tokens": prompt_tokens,
            "prompt_s": 50.0,
        },
    }


def status_reply(model: dict[str, Any] | None, url: str = "http://0.0.0.0:8080") -> StatusResponse:
    entry = {
        "file": "Qwen3-8B-Q4_K_M.gguf",
        "path": "/m/Qwen3-8B-Q4_K_M.gguf",
        "names": ["(default)"],
        "state": "loaded" if model else "unloaded",
        "since": 0.0,
    }
    return StatusResponse.model_validate(
        {
            "pid": 1,
            "version": "0",
            "started_at": 0.0,
            "uptime_s": 1.0,
            "state": "ready",
            "error": None,
            "config_file": "/c.json",
            "config_error": None,
            "socket_path": "/s",
            "log_file": None,
            "http": {"host": "0.0.0.0", "port": 8080, "url": url},
            "model": model,
            "model_loading": None,
            "aliases": {"claude-haiku-*": "/m/small.gguf"},
            "process": {"rss_bytes": 1, "cpu_percent": 0.0, "cpu_time_s": 0.0, "threads": 1},
            "requests": {
                "served": 0,
                "in_flight": 0,
                "running": 0,
                "queued": 0,
                "tokens_generated": 0,
                "prompt_tokens": 0,
                "cache_read_tokens": 0,
            },
            "last_reload": None,
            "models": [entry],
        }
    )


class FakeClient:
    """The daemon's replies, and what was asked of it."""

    def __init__(
        self, model: dict[str, Any] | None, key_file: Path | None = None, key: str | None = None
    ) -> None:
        self.model = model
        self.key_file = key_file
        self.key = key  # sent apart from the values, as the daemon does; None: as older ones
        self.loads: list[str] = []

    def status(self) -> StatusResponse:
        return status_reply(self.model)

    def config(self) -> Any:
        from pensieve.wire import ConfigResponse

        server = {
            "api_key": None if self.key is None else "**********",  # masked, as the daemon does
            "api_key_file": str(self.key_file) if self.key_file else None,
        }
        return ConfigResponse(
            config_file="/c.json",
            values={"server": server, "model": {"max_output_tokens": 4096}},
            flags=[],
            config_error=None,
            api_key=self.key,
        )

    def model_action(self, action: str, name: str) -> ModelActionResponse:
        self.loads.append(name)
        self.model = model_status()
        reply = status_reply(self.model)
        entry = reply.models[0]
        entry.model = reply.model
        return ModelActionResponse(action="load", model=entry, seconds=1.0)


class FakeContext(CommandContext):
    fake: FakeClient

    def client(self, timeout: float = 10.0) -> Any:
        return self.fake


def run(
    fake: FakeClient, argv: list[str], environ: dict[str, str]
) -> tuple[int, list[tuple[str, list[str], dict[str, str]]], FakeContext]:
    import io

    from pensievectl.claude import run_claude

    ours, theirs = split_passthrough(argv)
    args = cli.build_parser().parse_args(ours)
    args.claude_args = theirs
    ctx = FakeContext(out=io.StringIO(), err=io.StringIO())
    ctx.fake = fake
    execs: list[tuple[str, list[str], dict[str, str]]] = []
    code = run_claude(ctx, args, environ, lambda f, a, e: execs.append((f, a, e)))
    return code, execs, ctx


def test_claude_code_replaces_pensievectl_with_its_arguments_and_variables(
    tmp_path: Path,
) -> None:
    binary = executable(tmp_path / "claude")
    key = tmp_path / "key"
    key.write_text("file-key\n")
    environ = {"PATH": str(tmp_path), "ANTHROPIC_API_KEY": "sk-ant-real", "TERM": "xterm"}
    argv = ["claude", "-p", "two words", "--tools", "", "--settings", "s.json"]
    code, execs, ctx = run(FakeClient(model_status(), key), argv, environ)
    assert code == CtlExit.OK
    [(file, args, env)] = execs
    assert file == str(binary)
    assert args == [str(binary), "-p", "two words", "--tools", "", "--settings", "s.json"]
    assert env["TERM"] == "xterm" and "ANTHROPIC_API_KEY" not in env
    # The wildcard listen address is reached on this machine.
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8080"
    assert env["ANTHROPIC_AUTH_TOKEN"] == "file-key"
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "40960"
    assert env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "4096"
    assert env["CLAUDE_STREAM_IDLE_TIMEOUT_MS"] == "600000"
    assert "ANTHROPIC_DEFAULT_HAIKU_MODEL" not in env  # claude-haiku-* routes it
    err = ctx.err.getvalue()  # type: ignore[attr-defined]
    assert "context 40960 tokens" in err and "100 tokens/s" in err


def test_the_key_the_daemon_sends_is_used_not_the_masked_value(tmp_path: Path) -> None:
    code, _, ctx = run(FakeClient(model_status(), key="in-file-key"), ["claude", "--print-env"], {})
    assert code == CtlExit.OK
    assert "export ANTHROPIC_AUTH_TOKEN=in-file-key" in ctx.out.getvalue()  # type: ignore[attr-defined]


def test_an_unloaded_default_model_is_loaded_for_its_context(tmp_path: Path) -> None:
    fake = FakeClient(None)
    code, _, ctx = run(fake, ["claude", "--print-env"], {"PATH": ""})
    assert code == CtlExit.OK and fake.loads == ["/m/Qwen3-8B-Q4_K_M.gguf"]
    assert "export CLAUDE_CODE_MAX_CONTEXT_TOKENS=40960" in ctx.out.getvalue()  # type: ignore[attr-defined]


def test_a_small_context_stops_before_the_client_starts(tmp_path: Path) -> None:
    executable(tmp_path / "claude")
    with pytest.raises(ContextTooSmallError):
        run(FakeClient(model_status(context=8192)), ["claude"], {"PATH": str(tmp_path)})


def test_settings_are_written_to_claude_codes_config_dir(tmp_path: Path) -> None:
    environ = {"PATH": "", "CLAUDE_CONFIG_DIR": str(tmp_path / "cfg"), "HOME": str(tmp_path)}
    code, execs, ctx = run(FakeClient(model_status()), ["claude", "--settings"], environ)
    assert code == CtlExit.OK and execs == []
    written = json.loads((tmp_path / "cfg" / "settings.json").read_text())
    assert written["env"]["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "40960"
    assert "wrote 13 variables" in ctx.out.getvalue()  # type: ignore[attr-defined]
