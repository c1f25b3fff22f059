"""A GGUF file's metadata header, read without llama.cpp: the daemon sizes KV caches from it,
and `pensievectl models` describes downloaded models with it (stdlib only)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_GGUF_MAGIC = b"GGUF"
# GGUF value types: fixed-size scalars by struct format; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
_SCALARS[12] = "d"
_STRING, _ARRAY = 8, 9
# Tokenizer vocabularies come last and are large; architecture keys come before them.
_MAX_KEYS = 10_000


def read_gguf_metadata(path: Path) -> dict[str, str]:
    """A GGUF file's metadata keys with scalar values, as strings (as llama.cpp reports them);
    arrays of numbers are given as `[a,b,...]`, other arrays are skipped."""
    with path.open("rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = _unpack(f, "<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        _tensors, count = _unpack(f, "<QQ")
        if count > _MAX_KEYS:
            raise ValueError(f"{path}: implausible metadata count {count}")
        metadata: dict[str, str] = {}
        for _ in range(count):
            key = _string(f)
            (kind,) = _unpack(f, "<I")
            value = _value(f, kind)
            if value is not None:
                metadata[key] = value
        return metadata


def _unpack(f: BinaryIO, fmt: str) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)


def _string(f: BinaryIO) -> str:
    (length,) = _unpack(f, "<Q")
    if length > 1 << 24:
        raise ValueError("implausible GGUF string length")
    data = f.read(length)
    if len(data) != length:
        raise ValueError("truncated GGUF header")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> str | None:
    if kind in _SCALARS:
        (value,) = _unpack(f, "<" + _SCALARS[kind])
        return str(value).lower() if isinstance(value, bool) else str(value)
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, n = _unpack(f, "<IQ")
        if item in _SCALARS:
            fmt = _SCALARS[item]
            size = struct.calcsize(fmt)
            data = f.read(size * n)
            if len(data) != size * n:
                raise ValueError("truncated GGUF header")
            if n > 4096:  # a table (token scores, types): not metadata we read
                return None
            values = struct.unpack(f"<{n}{fmt}", data)
            return "[" + ",".join(str(v) for v in values) + "]"
        for _ in range(n):
            _value(f, item)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")
