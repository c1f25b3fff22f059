"""pensieved's command line (also the source of its man page)."""

from __future__ import annotations

import argparse

from pensieve import __version__

DESCRIPTION = (
    "Serve the Anthropic Messages API on localhost from a local GGUF model. Runs in the "
    "foreground and never forks (launchd, systemd or pensievectl supervise it); logs go to "
    "stderr. SIGTERM or SIGINT drain in-flight requests and exit 0; SIGHUP reloads the config."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pensieved", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"pensieved {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $PENSIEVE_CONFIG, else the per-user config directory's "
        "pensieve/config.json; a missing default file means defaults)",
    )
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port; 0: any free)")
    parser.add_argument(
        "--model", metavar="PATH", help="GGUF model file (overrides model.model_path)"
    )
    parser.add_argument(
        "--gpu-layers", type=int, metavar="N", help="layers offloaded to the GPU (-1: all)"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error", "critical"],
        help="overrides logging.level",
    )
    parser.add_argument(
        "--socket", metavar="PATH", help="control socket path (overrides server.socket_path)"
    )
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    """Dotted config keys set on the command line; flags win over the file."""
    pairs = {
        "server.host": args.host,
        "server.port": args.port,
        "server.socket_path": args.socket,
        "model.model_path": args.model,
        "model.gpu_layers": args.gpu_layers,
        "logging.level": args.log_level,
    }
    return {key: value for key, value in pairs.items() if value is not None}
