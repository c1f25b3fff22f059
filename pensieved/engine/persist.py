"""Warm KV caches across restarts: slots saved to disk at shutdown, read back at load.

An agent's prompt starts with thousands of tokens of system prompt and tools; evaluating them
again after every daemon restart or model reload takes minutes on a laptop CPU. When a model is
unloaded, its most recently used slots (of at least MIN_TOKENS) are written, tokens and KV
state, under the cache directory; when the same model is loaded again with the same settings,
they are read back into its slots, and the router reuses them like any warm slot.

Each model's files live in a directory named by a key over everything that makes a KV state
valid: the model file (path, size, modification time), the settings that shape its context,
and the llama.cpp build. A changed model or setting gets a new key, so stale states are never
read; the oldest directories are deleted to keep the total under the configured size.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from pensieved.engine.llama import lib
from pensieved.engine.model import LoadedModel
from pensieved.engine.slots import Slot

log = logging.getLogger("pensieved.engine")

MAGIC = b"PENSIEVE-KV 1\n"
# Shorter prefixes are quick to evaluate again; not worth the disk and the read at load.
MIN_TOKENS = 512


def model_key(model: LoadedModel) -> str:
    settings = model.settings
    path, size, mtime_ns = model.file_identity
    parts = {
        "path": path,
        "size": size,
        "mtime_ns": mtime_ns,
        "context": model.n_ctx,
        "slots": settings.slots,  # a saved state records the context's sequence count
        "gpu_layers": settings.gpu_layers,
        "flash_attention": settings.flash_attention,  # changes the V cache layout
        "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"{settings.path.stem}-{digest[:16]}"


def persistable(model: LoadedModel) -> bool:
    """Whether a slot's saved state is good for reuse of any prefix of it.

    Sliding-window models save only the cells the last position attends to, so a restored
    state could not be trimmed to a shorter prefix; their caches are not saved.
    """
    return model.sliding_window <= 0


class PrefixStore:
    def __init__(self, directory: Path, budget_bytes: int) -> None:
        self.directory = directory
        self.budget_bytes = budget_bytes

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def save(self, model: LoadedModel, slots: Sequence[Slot]) -> int:
        """Write the slots worth keeping, most recently used first; the count written.

        Only call with no generation running on `model`.
        """
        if not self.enabled or not persistable(model):
            return 0
        c = lib()

        target = self.directory / model_key(model)
        keep = sorted(
            (slot for slot in slots if len(slot.tokens) >= MIN_TOKENS),
            key=lambda slot: slot.last_used,
            reverse=True,
        )
        started = time.monotonic()
        shutil.rmtree(target, ignore_errors=True)
        written = used = 0
        for slot in keep:
            size = int(c.llama_state_seq_get_size(model.ctx, slot.index))
            if used + size > self.budget_bytes:
                log.info(
                    "not saving slot %d's KV cache (%d tokens, %.0f MB): over "
                    "model.prefix_cache_mb; raise it to keep this cache across restarts",
                    slot.index,
                    len(slot.tokens),
                    size / 1e6,
                )
                continue
            buffer = (ctypes.c_uint8 * size)()
            got = int(c.llama_state_seq_get_data(model.ctx, buffer, size, slot.index))
            if got == 0:
                log.warning("llama.cpp could not export slot %d's KV cache", slot.index)
                continue
            try:
                _write(target / f"slot-{written}.kv", slot, memoryview(buffer)[:got])
            except OSError as exc:
                log.warning("cannot save KV caches to %s: %s", target, exc)
                break
            written += 1
            used += got
        if written:
            log.info(
                "saved %d KV cache(s) of %s (%.0f MB) in %.1fs",
                written,
                model.name,
                used / 1e6,
                time.monotonic() - started,
            )
            self._prune(keep=target)
        return written

    def restore(self, model: LoadedModel, slots: Sequence[Slot]) -> int:
        """Read saved states into empty slots; the count restored. Bad files are deleted."""
        if not self.enabled or not persistable(model):
            return 0
        c = lib()

        try:
            source = self.directory / model_key(model)
            files = sorted(source.glob("slot-*.kv"))
        except OSError:
            return 0
        empty = [slot for slot in slots if not slot.tokens]
        restored = 0
        started = time.monotonic()
        for path, slot in zip(files, empty, strict=False):
            try:
                tokens, state = _read(path)
            except (OSError, ValueError) as exc:
                log.warning("discarding saved KV cache %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            if len(tokens) >= model.n_ctx:
                path.unlink(missing_ok=True)
                continue
            buffer = (ctypes.c_uint8 * len(state)).from_buffer(state)
            loaded = c.llama_state_seq_set_data(model.ctx, buffer, len(state), slot.index)
            last = c.llama_memory_seq_pos_max(model.memory, slot.index)
            if not loaded or last + 1 != len(tokens):
                log.warning("llama.cpp refused saved KV cache %s; deleting it", path)
                model.forget(slot.index, 0)
                path.unlink(missing_ok=True)
                continue
            slot.tokens = tokens
            restored += 1
        if restored:
            log.info(
                "restored %d KV cache(s) of %s in %.1fs",
                restored,
                model.name,
                time.monotonic() - started,
            )
        return restored

    def _prune(self, keep: Path) -> None:
        """Delete the least recently saved models' states until the total fits the budget."""
        try:
            folders = [p for p in self.directory.iterdir() if p.is_dir()]
            sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in folders}
        except OSError:
            return
        total = sum(sizes.values())
        for folder in sorted(folders, key=lambda p: p.stat().st_mtime):
            if total <= self.budget_bytes:
                break
            if folder != keep:
                shutil.rmtree(folder, ignore_errors=True)
                total -= sizes[folder]


def _write(path: Path, slot: Slot, state: memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"tokens": slot.tokens}).encode()
    partial = path.with_suffix(".partial")
    with partial.open("wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<QQ", len(meta), len(state)))
        f.write(meta)
        f.write(state)
    os.replace(partial, path)


def _read(path: Path) -> tuple[list[int], bytearray]:
    with path.open("rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a Pensieve KV cache file")
        header = f.read(16)
        if len(header) != 16:
            raise ValueError("truncated header")
        meta_len, state_len = struct.unpack("<QQ", header)
        if len(MAGIC) + 16 + meta_len + state_len != os.fstat(f.fileno()).st_size:
            raise ValueError("sizes in the header do not match the file")
        meta = json.loads(f.read(meta_len))
        tokens = meta.get("tokens") if isinstance(meta, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ValueError("bad token list")
        state = bytearray(state_len)
        if f.readinto(state) != state_len:
            raise ValueError("truncated state")
    return tokens, state


def saved_summary(directory: Path, model_file: Path) -> tuple[int, int]:
    """Tokens and bytes of the KV caches saved for `model_file` (any settings), for
    `pensievectl models`; read from the files' headers, not their states."""
    pattern = re.compile(re.escape(model_file.stem) + r"-[0-9a-f]{16}")
    tokens = size = 0
    try:
        folders = [p for p in directory.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]
        for folder in folders:
            for path in folder.glob("slot-*.kv"):
                with path.open("rb") as f:
                    if f.read(len(MAGIC)) != MAGIC:
                        continue
                    meta_len, _ = struct.unpack("<QQ", f.read(16))
                    meta = json.loads(f.read(meta_len))
                tokens += len(meta.get("tokens", ())) if isinstance(meta, dict) else 0
                size += path.stat().st_size
    except (OSError, ValueError, struct.error):
        pass  # a cache being written or pruned meanwhile: the figure is a hint
    return tokens, size
