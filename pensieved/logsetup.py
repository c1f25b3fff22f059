"""Logging: stderr always (launchd/systemd capture it), a file when configured, live levels."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from pensieve.config import LoggingConfig

_HANDLER_TAG = "_pensieve_handler"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def configure_logging(config: LoggingConfig) -> None:
    """(Re)configure the root logger; safe to call again on reload."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.file:
        path = Path(config.file).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(path, encoding="utf-8"))
        except OSError as exc:
            print(f"pensieved: cannot open log file {path}: {exc}", file=sys.stderr)
    for handler in handlers:
        setattr(handler, _HANDLER_TAG, True)
        handler.setFormatter(_formatter(config.format))
        root.addHandler(handler)
    root.setLevel(config.level.upper())
    # Tornado's own access log duplicates ours.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
