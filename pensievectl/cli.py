"""pensievectl's command line (also the source of its man page)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from pensieve import __version__
from pensieve.exitcodes import CTL_EXIT_DOCS, CtlExit
from pensievectl.context import CommandContext
from pensievectl.errors import CtlError, exit_status_for

DESCRIPTION = (
    "Control pensieved, the local Anthropic Messages API server, over its Unix control socket, "
    "and check its config file."
)


def _exit_status_text() -> str:
    # From the codes' one description (pensieve.exitcodes), so --help, the man page and the docs
    # cannot disagree; backticks are markup for the man page and the docs only.
    lines = ["exit status:"]
    for code, text in CTL_EXIT_DOCS.items():
        body = textwrap.wrap(text.replace("`", ""), width=88)
        lines.append(f"  {int(code)}  {body[0]}")
        lines += [f"     {line}" for line in body[1:]]
    return "\n".join(lines) + "\n\n"


EPILOG = (
    _exit_status_text()
    + """\
files:
  config  --config, else $PENSIEVE_CONFIG, else the per-user config directory's
          pensieve/config.json
  socket  --socket, else server.socket_path in the config, else $PENSIEVE_SOCKET, else
          the per-user runtime directory's pensieve/pensieved.sock; when the config does
          not parse (or nothing answers at its socket), the socket recorded by the daemon
          that serves that config (pensieve/run/ in the runtime directory)
"""
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pensievectl",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pensievectl {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $PENSIEVE_CONFIG, else the per-user default)",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="control socket (default: server.socket_path from the config, else the per-user "
        "runtime directory)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    start = commands.add_parser(
        "start",
        help="start pensieved (through launchd/systemd if its service is installed) and wait "
        "until the model is loaded",
    )
    start.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up waiting after this long (default: 300)",
    )
    start.add_argument(
        "--log-file",
        metavar="PATH",
        help="where a spawned daemon's output goes (default: the per-user log directory's "
        "pensieved.log)",
    )

    stop = commands.add_parser(
        "stop", help="stop pensieved gracefully (in-flight requests finish) and wait until gone"
    )
    stop.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long to wait (default: the daemon's drain timeout plus 10 s)",
    )

    status = commands.add_parser(
        "status", help="is pensieved running; its model, memory, requests and last reload"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    validate = commands.add_parser(
        "validate",
        help="validate a config file with the daemon's validator (and show what would change "
        "in the running daemon)",
    )
    validate.add_argument("file", nargs="?", metavar="FILE", help="default: the config file")

    reload = commands.add_parser("reload", help="make pensieved re-read its config file now")
    reload.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="do not wait for a new model to finish loading",
    )
    reload.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for a new model (default: 600)",
    )

    models = commands.add_parser(
        "models",
        help="the configured models and aliases: loaded or not, memory, cached tokens, last use",
    )
    models.add_argument("--json", action="store_true", help="machine-readable output")
    model_actions = models.add_subparsers(dest="models_command", metavar="ACTION")
    for action, text in (
        ("load", "load a model now (and restore its saved KV caches)"),
        ("unload", "unload a model once its requests are done, saving its KV caches"),
    ):
        sub = model_actions.add_parser(action, help=text)
        sub.add_argument(
            "name",
            metavar="NAME",
            help="a requested model name, an alias pattern, or the GGUF file's name or path",
        )
        sub.add_argument(
            "--json", dest="json_action", action="store_true", help="machine-readable output"
        )

    cache = commands.add_parser(
        "cache",
        help="why a turn was slow: each recent request's prompt tokens, what it read from the "
        "KV cache and from where, and where it diverged from the best cached prompt",
    )
    cache.add_argument("--json", action="store_true", help="machine-readable output")

    pull = commands.add_parser(
        "pull",
        help="download a GGUF model from Hugging Face (user/repo[:QUANT], user/repo/file.gguf, "
        "or a catalog name) into the Hugging Face cache, where model.model_path finds it",
    )
    pull.add_argument(
        "ref",
        nargs="?",
        metavar="REF",
        help="what to pull (default: the models the config names that are not pulled yet, "
        "else the catalog model that best fits the memory budget)",
    )
    pull.add_argument(
        "--list",
        dest="list_catalog",
        action="store_true",
        help="the catalog of coding models: which fit this machine's memory budget and why "
        "the others do not",
    )
    pull.add_argument("--yes", "-y", action="store_true", help="do not ask before a large download")

    rm = commands.add_parser(
        "rm",
        help="delete a downloaded model (and its split parts and mmproj) from the Hugging Face "
        "cache; refused while the config names it",
    )
    rm.add_argument("ref", metavar="REF", help="as for pull: user/repo[:QUANT], a file, a name")

    config = commands.add_parser("config", help="show the effective config or write a default one")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_commands.add_parser(
        "show", help="the effective config, each value with its source (default, file, flag)"
    )
    show.add_argument("--json", action="store_true", help="machine-readable output")
    generate = config_commands.add_parser("generate", help="print (or write) the default config")
    generate.add_argument("--output", metavar="FILE", help="write it to FILE instead of stdout")
    generate.add_argument("--force", action="store_true", help="overwrite an existing FILE")

    from pensievectl import claude, service

    service.add_subparser(commands)
    claude.add_subparser(commands)
    return parser


def dispatch(args: argparse.Namespace, ctx: CommandContext) -> int:
    command = args.command
    if command == "status":
        from pensievectl.status import run_status

        return run_status(ctx, args.json)
    if command in ("start", "stop"):
        from pensievectl import lifecycle
        from pensievectl.service import find_supervisor

        if command == "start":
            return lifecycle.run_start(
                ctx, timeout=args.timeout, log_file=args.log_file, find_supervisor=find_supervisor
            )
        return lifecycle.run_stop(ctx, timeout=args.timeout, find_supervisor=find_supervisor)
    if command == "models":
        from pensievectl import models

        as_json = bool(args.json or getattr(args, "json_action", False))
        if args.models_command is None:
            return models.run_models(ctx, as_json)
        return models.run_model_action(ctx, args.models_command, args.name, as_json)
    if command == "pull":
        from pensievectl.pull import run_pull

        return run_pull(ctx, args.ref, args.yes, args.list_catalog)
    if command == "rm":
        from pensievectl.downloads import run_rm

        return run_rm(ctx, args.ref)
    if command == "cache":
        from pensievectl.cache import run_cache

        return run_cache(ctx, args.json)
    from pensievectl import configcmds

    if command == "validate":
        return configcmds.run_validate(ctx, args.file)
    if command == "reload":
        return configcmds.run_reload(ctx, wait=args.wait, timeout=args.timeout)
    if command == "config":
        if args.config_command == "show":
            return configcmds.run_config_show(ctx, args.json)
        return configcmds.run_config_generate(ctx, args.output, args.force)
    if command == "service":
        from pensievectl.service import run_service

        return run_service(ctx, args.service_command, dry_run=args.dry_run)
    if command == "claude":
        from pensievectl.claude import run_claude

        return run_claude(ctx, args)
    raise AssertionError(f"unhandled command {command}")


def main(argv: Sequence[str] | None = None) -> int:
    from pensievectl.claude import split_passthrough

    ours, passthrough = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(ours)
    if passthrough is not None:
        args.claude_args = passthrough
        if passthrough and (args.print_env or args.settings is not None):
            parser.error(
                "claude: --print-env and --settings do not start Claude Code, so they take "
                f"no CLAUDE ARGS (got {' '.join(passthrough)})"
            )
    ctx = CommandContext(config_arg=args.config, socket_arg=args.socket)
    try:
        return int(dispatch(args, ctx))
    except CtlError as exc:
        print(f"pensievectl: {exc}", file=sys.stderr)
        return int(exit_status_for(exc))
    except KeyboardInterrupt:
        return int(CtlExit.FAILURE)


if __name__ == "__main__":
    raise SystemExit(main())
