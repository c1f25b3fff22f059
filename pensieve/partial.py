"""What of an invalid config file pensieved can still use when it starts.

A running daemon that reads a bad edit keeps its last good config. At start there is none in
memory, and falling back to defaults wholesale would move the HTTP API to a port nobody
looks at because of a typo in another section. So each section the daemon can use while
degraded (`server`, `logging`) is taken from the file when it validates on its own; one that
does not is replaced: `server` by the server section of the last good config the daemon saved
(`pensieve.runrecord.write_last_good`), else by defaults, `logging` by defaults. No model is
served from an invalid file (the daemon answers 503 until it is fixed), so `model` is always
the defaults.

A `server` section that does not come from the file is made safe, because the file's own
intent is unknown: it never listens beyond loopback, and when neither it nor the file's
usable `api_key`/`api_key_file` gives a key, it has none only because the user never set one
that can be read.

Stdlib and pydantic only (through `pensieve.config`): `pensievectl` may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, SecretStr

from pensieve.config import (
    Config,
    ConfigError,
    ConfigIssue,
    ServerConfig,
    cross_checks,
    is_loopback_name,
    validate_section,
)

Origin = Literal["file", "last_good", "defaults"]
SECTIONS: tuple[str, ...] = tuple(Config.model_fields)
# Sections a degraded daemon uses: where it listens and how it logs. A model is only ever
# loaded from a file that validates as a whole.
USED_WHEN_INVALID = frozenset({"server", "logging"})
ORIGIN_TEXT: dict[str, str] = {
    "file": "from the file",
    "last_good": "last good config",
    "defaults": "defaults",
}


@dataclass(frozen=True)
class SectionSource:
    """Where one section of the config in force came from, and why not from the file."""

    section: str
    origin: Origin
    issues: tuple[ConfigIssue, ...] = ()
    notes: tuple[str, ...] = ()

    def reason(self) -> str | None:
        parts = []
        if self.issues:
            parts.append("invalid: " + "; ".join(str(i) for i in self.issues))
        elif self.origin != "file" and self.section not in USED_WHEN_INVALID:
            parts.append("no model is served until the whole file is valid")
        parts += self.notes
        return "; ".join(parts) if parts else None

    def describe(self) -> str:
        reason = self.reason()
        text = f"{self.section}: {ORIGIN_TEXT[self.origin]}"
        return f"{text} ({reason})" if reason else text


@dataclass(frozen=True)
class Salvaged:
    """The config a degraded daemon starts on, and where each section came from."""

    config: Config
    sources: tuple[SectionSource, ...] = field(default_factory=tuple)

    def source(self, section: str) -> SectionSource:
        return next(s for s in self.sources if s.section == section)

    def describe(self) -> str:
        return "; ".join(s.describe() for s in self.sources)


def _last_good_server(last_good: Any) -> ServerConfig | None:
    """The server section of the saved last good config, if it still validates."""
    if not isinstance(last_good, dict) or "server" not in last_good:
        return None
    try:
        server = validate_section("server", last_good["server"])
    except ConfigError:
        return None
    return server if isinstance(server, ServerConfig) else None


def _guard_server(server: ServerConfig, raw: Any) -> tuple[ServerConfig, tuple[str, ...]]:
    """A server section standing in for the file's invalid one: loopback only, and the
    file's API key when it has none of its own and the file's can be used."""
    notes = []
    if not is_loopback_name(server.host):
        notes.append(f"host {server.host!r} limited to 127.0.0.1 while the file's is invalid")
        server = server.model_copy(update={"host": "127.0.0.1"})
    if server.api_key or server.api_key_file or not isinstance(raw, dict):
        return server, tuple(notes)
    key, key_file = raw.get("api_key"), raw.get("api_key_file")
    if isinstance(key, str) and key:
        server = server.model_copy(update={"api_key": SecretStr(key)})
        notes.append("API key taken from the file")
    elif isinstance(key_file, str) and key_file:
        server = server.model_copy(update={"api_key_file": key_file})
        notes.append("API key file taken from the file")
    return server, tuple(notes)


def _stand_in(name: str, last_good: Any, skip_last_good: bool) -> tuple[BaseModel, Origin]:
    """What replaces a section the file cannot give: the last good server section, else the
    defaults."""
    fallback = None if skip_last_good else _last_good_server(last_good)
    if name == "server" and fallback is not None:
        return fallback, "last_good"
    return validate_section(name, {}), "defaults"


def _server(sections: dict[str, BaseModel]) -> ServerConfig:
    server = sections["server"]
    assert isinstance(server, ServerConfig)
    return server


def salvage_config(data: Any, last_good: Any = None) -> Salvaged:
    """The config to start on when the file, decoded as `data` (None: it could not be read or
    decoded), is invalid. `last_good` is the saved last good config's data, if any. The
    result passes the cross-section checks."""
    readable = isinstance(data, dict)
    raw: dict[str, Any] = data if isinstance(data, dict) else {}
    unknown = sorted(k for k in raw if k not in SECTIONS)
    sections: dict[str, BaseModel] = {}
    origins: dict[str, Origin] = {}
    issues: dict[str, tuple[ConfigIssue, ...]] = {}
    unread: tuple[str, ...] = ()
    if not readable:
        unread = ("the file is not a JSON object" if data is not None else "the file is unusable",)
    notes_for: dict[str, tuple[str, ...]] = {}
    for name in SECTIONS:
        if not readable:
            notes_for[name] = unread
        elif name in raw:
            try:
                section = validate_section(name, raw[name])
            except ConfigError as exc:
                issues[name] = tuple(exc.issues)
            else:
                if name in USED_WHEN_INVALID:
                    sections[name], origins[name] = section, "file"
        elif unknown and name == "server":
            # Maybe misspelt: then the file's server section is not the defaults but unknown,
            # and the last good one stands in for it.
            names = ", ".join(repr(k) for k in unknown)
            issues[name] = (ConfigIssue(name, f"missing, and the file has unknown {names}"),)
        elif name in USED_WHEN_INVALID:
            sections[name], origins[name] = validate_section(name, {}), "file"
    skip_last_good = False
    # Each failed round moves a section from the file to a stand-in, from the last good
    # config to defaults, or everything to defaults (which pass): this ends.
    while True:
        for name in SECTIONS:
            if name not in sections:
                sections[name], origins[name] = _stand_in(name, last_good, skip_last_good)
                if name == "server":
                    sections[name], guarded = _guard_server(_server(sections), raw.get(name))
                    notes_for[name] = unread + guarded
        config = Config.model_validate(sections)
        failed = cross_checks(config)
        if not failed:
            break
        for issue in failed:
            name = issue.path.split(".", 1)[0]
            if origins.get(name) == "file":
                issues[name] = (*issues.get(name, ()), issue)
            elif origins.get(name) == "last_good":
                skip_last_good = True
            else:  # a rule spanning sections that a default one cannot satisfy
                for other in SECTIONS:
                    if origins[other] == "file":
                        issues[other] = (*issues.get(other, ()), issue)
                    if origins[other] != "defaults":
                        sections.pop(other)
                skip_last_good = True
            sections.pop(name, None)
    sources = tuple(
        SectionSource(name, origins[name], issues.get(name, ()), notes_for.get(name, ()))
        for name in SECTIONS
    )
    return Salvaged(config, sources)
