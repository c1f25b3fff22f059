"""Generate man/pensieved.8 and man/pensievectl.1 from the real argparse parsers.

argparse-manpage renders every subcommand and flag; the sections argparse knows nothing about
(FILES, SIGNALS, EXIT STATUS, ENVIRONMENT, SEE ALSO) are added here. Exit statuses come from
the shared IntEnums and their descriptions (pensieve.exitcodes), so a new code without a
description fails the generation instead of going undocumented. The config file's page,
pensieve.json(5), comes from packaging/gen_config_ref.py; `make docs` runs both.

    python packaging/gen_man.py            # rewrite man/*
    python packaging/gen_man.py --check    # exit 1 if a committed page is stale
"""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parents[1]
MAN_DIR = REPO / "man"
# A fixed date keeps the pages reproducible (the committed page must equal a fresh one);
# bump it together with the version when cutting a release.
MAN_DATE = "2026-11-25"
MANUAL = "Pensieve Manual"
E = TypeVar("E", bound=enum.IntEnum)


# Characters the man fonts lack (troff warns "can't find special character") spelled in ASCII.
_ROFF_CHARS = {"\u2026": "...", "\u2192": "->", "\u2190": "<-", "\u2248": "~"}


def roff(text: str) -> str:
    """Plain text to roff: `code` in bold, literal hyphens, and no hyphenation inside paths,
    flags, variable names or code (troff would otherwise break $PENSIEVE_CONFIG as $PEN-SIEVE)."""
    for char, spelled in _ROFF_CHARS.items():
        text = text.replace(char, spelled)
    out = []
    for i, part in enumerate(text.replace("\\", "\\e").split("`")):
        in_code = i % 2 == 1  # odd-numbered parts were between backticks
        words = []
        for word in part.split(" "):
            if in_code or any(c in word.rstrip(".,;:") for c in "/$_-.~"):
                word = "\\%" + word if word else word
            words.append(word.replace("-", "\\-"))
        joined = " ".join(words)
        out.append(f"\\fB{joined}\\fR" if in_code else joined)
    return "".join(out)


def tagged(items: Iterable[tuple[str, str]]) -> str:
    """A .TP list: an italic/bold tag line, then its paragraph."""
    lines: list[str] = []
    for tag, body in items:
        lines += [".TP", tag, roff(body)]
    return "\n".join(lines)


def path_tag(path: str) -> str:
    return f".I {roff(path)}" if " " not in path else f'.I "{roff(path)}"'


FILES = tagged(
    [
        (
            path_tag("~/Library/Application Support/pensieve/config.json"),
            "The config file on macOS when neither --config nor $PENSIEVE_CONFIG names one. "
            "A missing default file means all defaults. Under `brew services` the service "
            "reads $(brew --prefix)/etc/pensieve/config.json instead.",
        ),
        (
            path_tag("~/.config/pensieve/config.json"),
            "The default config file on Linux ($XDG_CONFIG_HOME is honoured).",
        ),
        (
            path_tag("~/Library/Caches/TemporaryItems/pensieve/pensieved.sock"),
            "The control socket on macOS (mode 0600 in a 0700 directory) that pensievectl "
            "talks to. On Linux it is $XDG_RUNTIME_DIR/pensieve/pensieved.sock, or "
            "/tmp/pensieve-UID/pensieved.sock without a login session. server.socket_path, "
            "--socket or $PENSIEVE_SOCKET choose another; the path must fit in 103 bytes.",
        ),
        (
            path_tag("$XDG_RUNTIME_DIR/pensieve/run/"),
            "Run records (same runtime directory as the socket): each running pensieved "
            "writes its pid, control socket and log file there under a name derived from its "
            "config file's path, with a small activity file naming the requests in flight, and "
            "removes both when it exits. pensievectl finds the daemon through them when the "
            "config file does not parse; a record left by a daemon that died tells `status` "
            "and `start` which signal ended it and what it was doing.",
        ),
        (
            path_tag("~/Library/Logs/pensieve/pensieved.log"),
            "The log of the LaunchAgent written by `pensievectl service install` on macOS. "
            "pensieved itself logs to standard error (and to logging.file when set); under "
            "`brew services` the log is $(brew --prefix)/var/log/pensieve.log, under systemd "
            "the journal (journalctl --user -u pensieved).",
        ),
        (
            path_tag("~/Library/LaunchAgents/dev.pensieve.pensieved.plist"),
            "The LaunchAgent installed by `pensievectl service install` on macOS "
            "(homebrew.mxcl.pensieve.plist when Homebrew manages the service).",
        ),
        (
            path_tag("~/.config/systemd/user/pensieved.service"),
            "The systemd user unit installed by `pensievectl service install` on Linux.",
        ),
    ]
)

ENVIRONMENT = tagged(
    [
        (".B PENSIEVE_CONFIG", "The config file used when --config is not given."),
        (".B PENSIEVE_SOCKET", "The control socket used when the config does not set one."),
    ]
)

CTL_ENVIRONMENT = "\n".join(
    [
        ENVIRONMENT,
        tagged(
            [
                (
                    ".B PENSIEVE_CLAUDE",
                    "The Claude Code binary `pensievectl claude` starts when --claude is not "
                    "given (default: claude on PATH).",
                ),
                (
                    ".B CLAUDE_CONFIG_DIR",
                    "Where `pensievectl claude --settings` finds Claude Code's settings.json "
                    "(default: ~/.claude), as Claude Code itself does.",
                ),
            ]
        ),
    ]
)

PENSIEVED_SIGNALS = tagged(
    [
        (
            ".B SIGTERM, SIGINT",
            "Stop accepting requests, let in-flight generations finish for up to "
            "server.drain_timeout_ms (15 s by default), end the rest with an error event, "
            "remove the control socket and exit 0. Service managers are configured to wait "
            "30 s before they kill the process.",
        ),
        (".B SIGHUP", "Re-read the config file and apply it, as `pensievectl reload` does."),
    ]
)


def exit_status(codes: type[E], docs: Mapping[E, str]) -> str:
    """The codes' descriptions (pensieve.exitcodes) as a .TP list; a code without one fails."""
    missing = [code.name for code in codes if code not in docs]
    if missing:
        raise SystemExit(
            f"gen_man: exit codes without a description in pensieve/exitcodes.py: {missing}"
        )
    return tagged((f".B {int(code)}", docs[code]) for code in codes)


@dataclass(frozen=True)
class Page:
    name: str
    section: int
    summary: str
    parser: Callable[[], argparse.ArgumentParser]
    sections: Callable[[], list[tuple[str, str]]]

    @property
    def path(self) -> Path:
        return MAN_DIR / f"{self.name}.{self.section}"


def _pensieved_parser() -> argparse.ArgumentParser:
    from pensieved.cli import build_parser

    return build_parser()


def _pensieved_sections() -> list[tuple[str, str]]:
    # daemon.py imports tornado and the engine; fine for a build-time script.
    from pensieve.exitcodes import DAEMON_EXIT_DOCS, DaemonExit

    return [
        ("SIGNALS", PENSIEVED_SIGNALS),
        ("EXIT STATUS", exit_status(DaemonExit, DAEMON_EXIT_DOCS)),
        ("ENVIRONMENT", ENVIRONMENT),
        ("FILES", FILES),
        ("SEE ALSO", "pensievectl(1), pensieve.json(5), launchd.plist(5), systemd.service(5)"),
    ]


def _pensievectl_parser() -> argparse.ArgumentParser:
    from pensievectl.cli import build_parser

    return build_parser()


def _pensievectl_sections() -> list[tuple[str, str]]:
    from pensieve.exitcodes import CTL_EXIT_DOCS, CtlExit

    return [
        ("EXIT STATUS", exit_status(CtlExit, CTL_EXIT_DOCS)),
        ("ENVIRONMENT", CTL_ENVIRONMENT),
        ("FILES", FILES),
        ("SEE ALSO", "pensieved(8), pensieve.json(5), launchctl(1), systemctl(1), brew(1)"),
    ]


PAGES = [
    Page(
        "pensieved",
        8,
        "serve the Anthropic Messages API on localhost from a local GGUF model",
        _pensieved_parser,
        _pensieved_sections,
    ),
    Page(
        "pensievectl",
        1,
        "control the pensieved daemon: start, stop, status, reload, config, service, and "
        "start Claude Code against it",
        _pensievectl_parser,
        _pensievectl_sections,
    ),
]


def render(page: Page) -> str:
    from pensieve import __version__

    parser = page.parser()
    # The --help epilog (exit codes, files) would come out as a COMMENTS section repeating
    # the EXIT STATUS and FILES sections added below.
    parser.epilog = None
    man = Manpage(
        parser,
        _data={
            "project_name": "pensieve",
            "version": __version__,
            "manual_section": page.section,
            "manual_title": MANUAL,
            "description": page.summary,
            "date": MAN_DATE,
        },
    )
    for heading, content in page.sections():
        man.add_section(heading, "=", content)
    return str(man)


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--check", action="store_true", help="fail if a committed page is stale")
    cli.add_argument("pages", nargs="*", help="page names (default: all)")
    args = cli.parse_args(argv)
    stale = []
    for page in PAGES:
        if args.pages and page.name not in args.pages:
            continue
        text = render(page)
        if args.check:
            if not page.path.exists() or page.path.read_text() != text:
                stale.append(str(page.path.relative_to(REPO)))
        else:
            page.path.parent.mkdir(exist_ok=True)
            page.path.write_text(text)
            print(f"wrote {page.path.relative_to(REPO)}")
    if stale:
        print(f"stale man pages (run `make man`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
