"""`pensievectl claude [CLAUDE ARGS...]`: start Claude Code against this daemon (as `ollama launch
claude` does for Ollama), or print its variables (`--print-env`), or write them into Claude
Code's settings.json (`--settings`). What the variables are is `pensievectl.claude_env`'s part;
this module asks the daemon, finds the client and hands over to it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pensieve.exitcodes import CtlExit
from pensievectl.claude_env import MANAGED, ClaudeEnv, Daemon, claude_env, shell_exports
from pensievectl.context import CommandContext
from pensievectl.errors import (
    ClaudeNotFoundError,
    InvalidConfigError,
    NotServingError,
    SettingsFileError,
)

if TYPE_CHECKING:
    from pensieve.wire import ConfigResponse

# Loading the model reads its weights and saved KV caches: minutes on a slow disk.
LOAD_TIMEOUT_S = 900.0
INSTALL_HINT = "install it with `npm install -g @anthropic-ai/claude-code`"
# Options of pensievectl itself that take a value (the command comes after them).
_GLOBAL_WITH_VALUE = ("--config", "--socket")

Exec = Callable[[str, list[str], dict[str, str]], object]


def add_subparser(commands: Any) -> None:
    claude = commands.add_parser(
        "claude",
        usage="pensievectl claude [-h] [--print-env] [--settings [PATH]] [--claude PATH] "
        "[CLAUDE ARGS ...]",
        help="start Claude Code against this pensieved (base URL, key, models, context and "
        "timeouts set for its model)",
        description="Start Claude Code (`claude`) with its environment pointed at this "
        "pensieved: the base URL and API key, the local model for its opus, sonnet and haiku "
        "names (and in /model under its own name), the model's real context so that it "
        "compacts before the daemon refuses a prompt, and timeouts from the model's measured "
        "prefill rate. Every argument after this command's own options goes to claude as it "
        "is; `--` ends them (`pensievectl claude -- --settings FILE` passes claude's own "
        "--settings). Before starting it, a model whose context cannot hold Claude Code's "
        "prompt and tools (about 20,000 tokens), a reply (model.max_output_tokens) and room to "
        "work is refused, naming the settings to change; so is a machine without `claude` "
        "(`npm install -g @anthropic-ai/claude-code` installs it).",
    )
    claude.add_argument(
        "--print-env",
        action="store_true",
        help='print the variables as shell exports (eval "$(pensievectl claude --print-env)") '
        "instead of starting Claude Code",
    )
    claude.add_argument(
        "--settings",
        nargs="?",
        const="",
        metavar="PATH",
        help="write the variables into the `env` block of Claude Code's settings.json "
        "(default: $CLAUDE_CONFIG_DIR/settings.json, else ~/.claude/settings.json), keeping "
        "its other keys, instead of starting Claude Code",
    )
    claude.add_argument(
        "--claude",
        metavar="PATH",
        help="the Claude Code binary (default: $PENSIEVE_CLAUDE, else `claude` on PATH)",
    )
    claude.add_argument(
        "claude_args",
        nargs=argparse.REMAINDER,
        metavar="CLAUDE ARGS",
        help="passed to claude unchanged",
    )


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """For `claude`: the arguments argparse should see, and those that go to Claude Code as they
    are (None for other commands). Claude Code's options are not ours to parse: `-p` and its
    own `--settings` must reach it untouched, so ours must come first."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in _GLOBAL_WITH_VALUE else 1
    if i >= len(argv) or argv[i] != "claude":
        return argv, None
    j = i + 1
    while j < len(argv):
        token = argv[j]
        if token == "--":
            return argv[:j], argv[j + 1 :]
        name, has_value, _ = token.partition("=")
        if name in ("--print-env", "-h", "--help") or (
            has_value and name in ("--claude", "--settings")
        ):
            j += 1
        elif name == "--claude":
            j += 2
        elif name == "--settings":
            takes_path = j + 1 < len(argv) and not argv[j + 1].startswith("-")
            j += 2 if takes_path else 1
        else:
            break
    return argv[:j], argv[j:]


def find_claude(flag: str | None, environ: Mapping[str, str]) -> str:
    """The Claude Code binary: `--claude`, else $PENSIEVE_CLAUDE, else `claude` on PATH."""
    search = environ.get("PATH")
    named = flag or environ.get("PENSIEVE_CLAUDE")
    if named:
        found = shutil.which(str(Path(named).expanduser()), path=search)
        if found is None:
            source = "--claude" if flag else "$PENSIEVE_CLAUDE"
            raise ClaudeNotFoundError(
                f"{named} ({source}) is not an executable Claude Code: point it at the "
                f"`claude` binary, or {INSTALL_HINT}"
            )
        return found
    found = shutil.which("claude", path=search)
    if found is None:
        raise ClaudeNotFoundError(
            f"Claude Code is not installed (no `claude` on PATH): {INSTALL_HINT} (or name its "
            "binary with --claude PATH or $PENSIEVE_CLAUDE)"
        )
    return found


def _reachable(url: str) -> str:
    """A URL a client can connect to: a wildcard listen address means this machine."""
    return url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")


def _api_key(running: ConfigResponse) -> str | None:
    """The daemon's API key: as it sends it, else (an older daemon, or a key file it cannot
    read) read from its key file here, which says what is wrong with the file."""
    if running.api_key is not None:
        return running.api_key
    from pensieve.config import Config, ConfigError, ServerConfig, api_key

    key_file = running.values.get("server", {}).get("api_key_file")
    try:
        return api_key(Config(server=ServerConfig(api_key_file=key_file)))
    except ConfigError as exc:
        raise InvalidConfigError(
            f"{exc.issues[0]}: Claude Code would be refused without the key"
        ) from None


def gather(ctx: CommandContext) -> Daemon:
    """Ask the daemon what Claude Code's settings depend on, loading its default model first
    when it is not loaded (its context is known only then)."""
    client = ctx.client(timeout=10.0)
    status = client.status()
    if status.http.url is None:
        raise NotServingError(
            f"pensieved is not listening for HTTP ({status.http.error}): see `pensievectl status`"
        )
    model = status.model
    if model is None:
        default = next((m for m in status.models if "(default)" in m.names), None)
        if default is None:
            raise NotServingError(
                f"pensieved serves no model ({status.error or status.state}): set "
                "model.model_path, see `pensievectl status`"
            )
        ctx.note(f"pensievectl: loading {default.file} to read its context...")
        loaded = ctx.client(timeout=LOAD_TIMEOUT_S).model_action("load", default.path)
        model = loaded.model.model
        if model is None:
            raise NotServingError(f"{default.file} did not load: see `pensievectl status`")
    running = client.config()
    values = running.values
    return Daemon(
        base_url=_reachable(status.http.url),
        api_key=_api_key(running),
        model_name=model.name,
        model_file=Path(model.path).name,
        context=model.context_size,
        max_output_tokens=int(values.get("model", {}).get("max_output_tokens", 8192)),
        prompt_tokens=model.decode.prompt_tokens,
        prompt_s=model.decode.prompt_s,
        aliases=tuple(status.aliases),
        upstreams=tuple(route.pattern for route in status.upstreams),
    )


def settings_path(flag: str, environ: Mapping[str, str]) -> Path:
    if flag:
        return Path(flag).expanduser()
    config_dir = environ.get("CLAUDE_CONFIG_DIR")
    if config_dir:
        return Path(config_dir).expanduser() / "settings.json"
    home = environ.get("HOME")
    return (Path(home) if home else Path.home()) / ".claude" / "settings.json"


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsFileError(f"cannot read {path}: {exc.strerror}") from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise SettingsFileError(
            f"{path} is not valid JSON{where}: fix it or move it away (nothing was written)"
        ) from None
    if not isinstance(data, dict):
        raise SettingsFileError(f"{path} holds no JSON object: fix it (nothing was written)")
    return data


def write_settings(path: Path, variables: Mapping[str, str]) -> None:
    """Put `variables` into settings.json's `env`, atomically: other keys, and other variables
    in `env`, stay as they were (in their order); ours from an earlier run that no longer
    apply go. A symlinked settings.json (dotfiles) is written through, not replaced."""
    path = path.resolve() if path.is_symlink() else path
    data = _read_settings(path)
    env = data.get("env", {})
    if not isinstance(env, dict):
        raise SettingsFileError(f"{path}: `env` is not an object: fix it (nothing was written)")
    merged = {
        name: variables.get(name, value)
        for name, value in env.items()
        if name in variables or name not in MANAGED
    }
    data["env"] = merged | dict(variables)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600  # it may hold the daemon's API key
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise SettingsFileError(f"cannot write {path}: {exc.strerror}") from None


def _header(daemon: Daemon) -> str:
    return (
        f"Claude Code -> pensieved at {daemon.base_url}: {daemon.model_name} "
        f"({daemon.model_file}), context {daemon.context} tokens"
    )


def _describe(env: ClaudeEnv, daemon: Daemon) -> list[str]:
    return [_header(daemon), *(f"  {note}" for note in env.notes)]


def run_claude(
    ctx: CommandContext,
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    execvpe: Exec = os.execvpe,
) -> int:
    environ = os.environ if environ is None else environ
    starts = not (args.print_env or args.settings is not None)
    # Before asking the daemon: without the client nothing else matters.
    binary = find_claude(args.claude, environ) if starts else None
    daemon = gather(ctx)
    env = claude_env(daemon)
    if args.print_env:
        ctx.say(shell_exports(env, _header(daemon)))
    if args.settings is not None:
        path = settings_path(args.settings, environ)
        write_settings(path, env.variables)
        report = ctx.note if args.print_env else ctx.say
        report(f"wrote {len(env.variables)} variables into the env block of {path}")
        if not args.print_env:
            for line in _describe(env, daemon):
                report(line)
    if binary is None:
        return CtlExit.OK
    for line in _describe(env, daemon):
        ctx.note(line if line.startswith(" ") else f"pensievectl: {line}")
    # A key for Anthropic itself would make Claude Code ask which credential to use.
    child = {name: value for name, value in environ.items() if name != "ANTHROPIC_API_KEY"}
    child |= env.variables
    try:
        execvpe(binary, [binary, *args.claude_args], child)
    except OSError as exc:
        raise ClaudeNotFoundError(f"cannot run {binary}: {exc.strerror}") from None
    return CtlExit.OK  # only a test's stand-in for exec returns
