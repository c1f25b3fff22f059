"""What every command needs: which config file, which socket, and a client for it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pensievectl.client import ControlClient
from pensieved.control.sockets import resolve_socket_path
from pensieved.paths import default_config_path


@dataclass
class Context:
    config_arg: str | None = None
    socket_arg: str | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    @property
    def config_path(self) -> Path:
        """`--config`, else $PENSIEVE_CONFIG, else the per-user default (as pensieved does)."""
        if self.config_arg:
            return Path(self.config_arg).expanduser().absolute()
        return default_config_path().absolute()

    @property
    def config_may_be_missing(self) -> bool:
        # Only the implicit default location may be absent (it then means all defaults).
        return self.config_arg is None and self.config_path == default_config_path().absolute()

    @property
    def socket_path(self) -> Path:
        return resolve_socket_path(self.socket_arg, self.config_path)

    def client(self, timeout: float = 10.0) -> ControlClient:
        return ControlClient(self.socket_path, timeout=timeout)

    def say(self, message: str) -> None:
        print(message, file=self.out)

    def note(self, message: str) -> None:
        print(message, file=self.err)
