"""`validate`, `reload`, `config show` and `config generate`.

Validation uses `pensieve.config.load_config_file`, the daemon's own validator; it is
imported only here, so commands that do not validate never pay for pydantic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pensieve.exitcodes import CtlExit
from pensieve.sockets import probe
from pensievectl.context import CommandContext
from pensievectl.errors import (
    CtlError,
    InvalidConfigError,
    OutputExistsError,
    ReloadFailedError,
)

if TYPE_CHECKING:
    from pensieve.wire import Change, StatusResponse


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


_ACTIONS = {
    "live": "applied at once",
    "rebind": "new listener opened before the old one closes",
    "model": "model loaded in the background, then switched",
    "restart": "takes effect at the next start",
}


def format_changes(changes: list[Change]) -> list[str]:
    return [
        f"  {c.key}: {_show(c.old)} -> {_show(c.new)}  ({_ACTIONS.get(c.action, '')})"
        for c in changes
    ]


def _say_changes(ctx: CommandContext, changes: list[Change], heading: str, if_none: str) -> None:
    if not changes:
        ctx.say(if_none)
        return
    ctx.say(heading)
    for line in format_changes(changes):
        ctx.say(line)


def _running_daemon(ctx: CommandContext) -> StatusResponse | None:
    """The daemon serving this config file, if one answers."""
    if probe(ctx.socket_path) != "live":
        return None
    try:
        return ctx.client().status()
    except CtlError:
        return None


def _keeps_running(status: StatusResponse) -> str:
    return (
        f"pensieved (pid {status.pid}) keeps serving on its last good config, and applies "
        "the file by itself once it is fixed (`pensievectl status` shows what it sees)"
    )


def run_validate(ctx: CommandContext, file: str | None) -> int:
    from pensieve.config import ConfigError, load_config_file

    path = Path(file).expanduser().absolute() if file else ctx.config_path
    missing_ok = file is None and ctx.config_may_be_missing
    if missing_ok and not path.exists():
        ctx.say(f"no config file at {path}: pensieved uses the defaults (that is valid)")
    try:
        load_config_file(path, missing_ok=missing_ok)
    except ConfigError as exc:
        message = str(exc)
        status = _running_daemon(ctx) if file is None or path == ctx.config_path else None
        if status is not None:
            message += (
                "\nwhat loading it would change in the running daemon cannot be shown until "
                f"it validates; {_keeps_running(status)}"
            )
        raise InvalidConfigError(message) from None
    if path.exists():
        ctx.say(f"{path} is valid")
    if probe(ctx.socket_path) != "live" or not path.exists():
        return 0
    try:
        reply = ctx.client().validate(path)
    except CtlError as exc:
        ctx.note(f"(could not ask the running pensieved what would change: {exc})")
        return 0
    if not reply.valid:
        # The daemon's flags apply on top of the file there and can make it invalid.
        issues = "\n".join(f"  {i.path}: {i.message}" for i in reply.issues)
        raise InvalidConfigError(
            f"with the running daemon's command-line flags on top, {reply.source} is "
            f"invalid:\n{issues}"
        )
    _say_changes(
        ctx,
        reply.changes,
        "loading it into the running pensieved would change:",
        "it matches the running pensieved's config: loading it changes nothing",
    )
    return 0


def run_reload(ctx: CommandContext, *, wait: bool, timeout: float) -> int:
    client = ctx.client()
    result = client.reload()
    if not result.ok:
        raise ReloadFailedError(
            f"reload failed; pensieved keeps its running config, and applies the file by "
            f"itself once it is fixed (`pensievectl validate` checks it):\n{result.error}"
        )
    _say_changes(ctx, result.changes, "reloaded: applied", "reloaded: nothing changed")
    if not result.model_loading:
        return 0
    if not wait:
        ctx.say("the new model is loading in the background; the old one serves until then")
        return 0
    ctx.note("loading the new model; the old one keeps serving meanwhile...")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status()
        if not status.model_loading:
            last = status.last_reload
            if last is not None and not last.ok:
                raise ReloadFailedError(f"the new model did not load: {last.error}")
            model = status.model
            name, path = (model.name, model.path) if model else (None, None)
            ctx.say(f"now serving {name} ({path})")
            return 0
        time.sleep(0.2)
    ctx.say(f"the model is still loading after {timeout:g} s; check `pensievectl status`")
    return 0


def _sources(raw: Any, overrides: dict[str, Any], defaults: dict[str, Any]) -> dict[str, str]:
    sources: dict[str, str] = {}
    for section, values in defaults.items():
        in_file = raw.get(section) if isinstance(raw, dict) else None
        for key in values:
            dotted = f"{section}.{key}"
            if dotted in overrides:
                sources[dotted] = "flag"
            elif isinstance(in_file, dict) and key in in_file:
                sources[dotted] = "file"
            else:
                sources[dotted] = "default"
    return sources


def run_config_show(ctx: CommandContext, as_json: bool) -> int:
    from pensieve.config import Config, ConfigError, apply_overrides, load_config_file

    path = ctx.config_path
    overrides: dict[str, Any] = {}
    if ctx.socket_arg:
        overrides["server.socket_path"] = str(Path(ctx.socket_arg).expanduser())
    try:
        config = load_config_file(path, missing_ok=ctx.config_may_be_missing)
        if overrides:
            config = apply_overrides(config, overrides)
    except ConfigError as exc:
        return _show_running_instead(ctx, str(exc), as_json)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raw = {}
    effective = config.model_dump(mode="json")
    sources = _sources(raw, overrides, Config().model_dump(mode="json"))
    sizing = _auto_sizing(ctx, effective)
    if as_json:
        payload = {
            "config_file": str(path),
            "values": effective,
            "sources": sources,
        }
        if sizing is not None:
            payload["auto_sizes"] = sizing
        ctx.say(json.dumps(payload, indent=2))
        return 0
    exists = "" if path.exists() else " (absent: defaults)"
    ctx.say(f"# effective config from {path}{exists}; source in brackets")
    for section, values in effective.items():
        fields = type(getattr(config, section)).model_fields
        for key, value in values.items():
            dotted = f"{section}.{key}"
            description = fields[key].description or ""
            ctx.say(f"{dotted} = {_show(value)}  [{sources[dotted]}]  # {description}")
    if sizing is not None:
        ctx.say(f"# auto sizes: {sizing}")
    return 0


def _auto_sizing(ctx: CommandContext, effective: dict[str, Any]) -> str | None:
    """What `auto` context and slots became, from the daemon running this config."""
    model = effective.get("model", {})
    if "auto" not in (model.get("context_size"), model.get("slots")):
        return None
    status = _running_daemon(ctx)
    if status is None or status.model is None or status.model.kv is None:
        return (
            "chosen when the model loads (from the budget, the weights and the model's "
            "shape); `pensievectl status` shows the choice"
        )
    return status.model.kv.sizing


def _show_running_instead(ctx: CommandContext, file_error: str, as_json: bool) -> int:
    """The file does not validate: show the config the running daemon uses instead."""
    from pensieve.config import Config

    if probe(ctx.socket_path) != "live":
        raise InvalidConfigError(
            f"{file_error}\nno pensieved is running for it, so there is no config in force to "
            "show instead; `pensievectl validate` lists the errors"
        )
    running = ctx.client().config()
    flags = set(running.flags)
    if as_json:
        payload = {
            "config_file": str(ctx.config_path),
            "file_error": file_error,
            "running": running.model_dump(mode="json", exclude={"api_key"}),
        }
        ctx.say(json.dumps(payload, indent=2))
    else:
        ctx.say(
            f"# {ctx.config_path} is invalid, so its effective config cannot be shown; this is "
            "the config the running pensieved uses (its last good read of the file, flags on "
            "top); source in brackets"
        )
        for section, values in running.values.items():
            fields = type(getattr(Config(), section)).model_fields
            for key, value in values.items():
                dotted = f"{section}.{key}"
                source = "flag" if dotted in flags else "running"
                description = fields[key].description if key in fields else ""
                ctx.say(f"{dotted} = {_show(value)}  [{source}]  # {description or ''}")
    ctx.note(
        f"pensievectl: {file_error}\nthe running daemon keeps the config shown above until "
        "the file is fixed"
    )
    return int(CtlExit.FAILURE)


def run_config_generate(ctx: CommandContext, output: str | None, force: bool) -> int:
    from pensieve.config import default_config_json

    text = default_config_json()
    if output is None:
        ctx.out.write(text)
        return 0
    path = Path(output).expanduser()
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists: choose another path or pass --force")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    ctx.note(f"wrote the default config to {path}; `pensievectl config show` explains each key")
    return 0
