"""What every pensievectl command needs: which config file, which socket, a client for it, and
where to write."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pensieve.client import ControlClient
from pensieve.paths import default_config_path
from pensievectl.discovery import Location, locate


@dataclass
class CommandContext:
    config_arg: str | None = None
    socket_arg: str | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    _location: Location | None = field(default=None, init=False, repr=False)

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
    def location(self) -> Location:
        """Where the daemon for this config file is (looked up once; see `relocate`)."""
        if self._location is None:
            self._location = locate(self.config_path, self.socket_arg)
        return self._location

    def relocate(self) -> Location:
        """Look again: a daemon may have started or stopped since."""
        self._location = None
        return self.location

    @property
    def socket_path(self) -> Path:
        return self.location.socket_path

    def client(self, timeout: float = 10.0) -> ControlClient:
        return ControlClient(self.socket_path, timeout=timeout)

    def say(self, message: str) -> None:
        print(message, file=self.out)

    def note(self, message: str) -> None:
        print(message, file=self.err)
