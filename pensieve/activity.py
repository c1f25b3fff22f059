"""What the daemon is doing right now, kept where it survives a crash.

A native crash (a signal in llama.cpp) ends the process before Python can log anything but
faulthandler's traceback, which shows threads, not requests. So the daemon keeps its in-flight
work (request ids, what each asked for, which phase it is in, model loads) in a small file
mapped into memory: an update is a memory copy, no system call, a few times per request and
never per token. The kernel keeps the pages when the process dies, and `pensievectl`
(through `pensieve.postmortem`) reads them back to name the request that was running.

Layout: an 8-byte header (magic, then the index of the half holding the current copy) and
two halves, each a 4-byte length and JSON. An update writes the other half, then flips the
index byte, so a crash in the middle of an update leaves the previous copy readable.

Stdlib only: `pensievectl` reads these files.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"PVA1"
HEADER = 8
HALF = 32 * 1024
SIZE = HEADER + 2 * HALF
# Beyond this many entries the list is cut (and says how many were left out).
MAX_ENTRIES = 100


@dataclass
class WorkEntry:
    id: str  # request id (`request-id` header), or "load-N" for a model load
    what: str  # what was asked: method, path, model, stream, max_tokens; or the model file
    phase: str
    since: float  # Unix time it began
    phase_since: float


class Activity:
    """The daemon's in-flight work, mirrored into a crash-proof file when one is open."""

    def __init__(self) -> None:
        self.entries: dict[str, WorkEntry] = {}
        self._map: mmap.mmap | None = None
        self._path: Path | None = None
        self._half = 0
        self._loads = 0

    def open(self, path: Path) -> None:
        """Mirror into `path` from now on (created 0600, replacing what a predecessor left)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._map[0:4] = MAGIC
        os.replace(tmp, path)
        self._path = path
        self._flush()

    def close(self, *, remove: bool) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if remove and self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()

    def begin(self, work_id: str, what: str, phase: str) -> None:
        now = time.time()
        # Model names come from clients: bounded, so one request cannot crowd out the rest,
        # and printable, so `pensievectl status` never writes a client's escape sequences
        # to a terminal.
        shown = "".join(c if c.isprintable() else "?" for c in what[:300])
        self.entries[work_id] = WorkEntry(work_id, shown, phase, now, now)
        self._flush()

    def phase(self, work_id: str, phase: str) -> None:
        entry = self.entries.get(work_id)
        if entry is not None and entry.phase != phase:
            entry.phase = phase
            entry.phase_since = time.time()
            self._flush()

    def end(self, work_id: str) -> None:
        if self.entries.pop(work_id, None) is not None:
            self._flush()

    @contextlib.contextmanager
    def loading(self, model_path: str) -> Iterator[None]:
        """A model load, which runs in llama.cpp for seconds to minutes."""
        self._loads += 1
        work_id = f"load-{self._loads}"
        self.begin(work_id, f"model {model_path}", "loading the model")
        try:
            yield
        finally:
            self.end(work_id)

    def snapshot(self) -> list[dict[str, Any]]:
        return [vars(e).copy() for e in self.entries.values()]

    def _flush(self) -> None:
        if self._map is None:
            return
        try:
            self._write()
        except (OSError, ValueError, TypeError):
            # Best effort: the record must never fail a request. Stop mirroring.
            self.close(remove=False)

    def _write(self) -> None:
        assert self._map is not None
        head = json.dumps({"pid": os.getpid(), "updated": time.time()}, separators=(",", ":"))
        budget = HALF - 4 - len(head) - 64
        kept: list[bytes] = []
        # Newest first until the half is full: the oldest are left out (and counted).
        for entry in reversed(list(self.entries.values())[-MAX_ENTRIES:]):
            item = json.dumps(vars(entry), separators=(",", ":")).encode()
            if len(item) + 1 > budget:
                break
            budget -= len(item) + 1
            kept.append(item)
        left_out = len(self.entries) - len(kept)
        tail = f',"left_out":{left_out}' if left_out else ""
        payload = (
            (head[:-1].encode() + b',"work":[' + b",".join(reversed(kept)) + b"]")
            + tail.encode()
            + b"}"
        )
        half = 1 - self._half
        start = HEADER + half * HALF
        self._map[start : start + 4] = struct.pack("<I", len(payload))
        self._map[start + 4 : start + 4 + len(payload)] = payload
        # The flip: one byte, so a reader (or the file after a crash) sees one whole copy.
        self._map[4] = half
        self._half = half


def read_activity(path: Path) -> dict[str, Any] | None:
    """The last copy a daemon wrote to `path` (alive or dead), or None."""
    try:
        with path.open("rb") as f:
            raw = f.read(SIZE)
    except OSError:
        return None
    if len(raw) < SIZE or raw[:4] != MAGIC or raw[4] not in (0, 1):
        return None
    start = HEADER + raw[4] * HALF
    (length,) = struct.unpack("<I", raw[start : start + 4])
    if length > HALF - 4:
        return None
    try:
        data = json.loads(raw[start + 4 : start + 4 + length])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
