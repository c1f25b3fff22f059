"""Warm KV caches across restarts: slots saved to disk at shutdown, read back at load.

An agent's prompt starts with thousands of tokens of system prompt and tools; evaluating them
again after every daemon restart or model reload takes minutes on a laptop CPU. When a model is
unloaded, its most recently used slots (of at least MIN_TOKENS) are written, tokens and KV
state, under the cache directory; when the same model is loaded again with the same settings,
they are read back into its slots, and the router reuses them like any warm slot.

Slots that share a prefix's cells (see kvpool.py) save it once: a slot whose first positions
are the same cells as a slot saved before it writes only its own tail (staged in the model's
scratch sequence, the one part of its cells llama.cpp can export alone) and names that slot
as its base; at restore the tail is read back and the base's prefix shared into it again.

Each model's files live in a directory named by a key over everything that makes a KV state
valid: the model file (path, size, modification time), the settings that shape its context,
and the llama.cpp build. A changed model or setting gets a new key, so stale states are never
read; the oldest directories are deleted to keep the total under the configured size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from pensieved.engine.llama import package_version
from pensieved.engine.model import LoadedModel
from pensieved.engine.slots import Slot

log = logging.getLogger("pensieved.engine")

MAGIC = b"PENSIEVE-KV 2\n"
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
        "slots": model.slots,  # a saved state records the context's sequence count
        "pool": model.pool_tokens,
        "kv_cache_type": settings.kv_cache_type,
        "layout": "unified" if model.unified else "per-slot",
        "gpu_layers": settings.gpu_layers,
        "flash_attention": settings.flash_attention,  # changes the V cache layout
        "llama_cpp_python": package_version(),
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
        target = self.directory / model_key(model)
        keep = sorted(
            (slot for slot in slots if len(slot.tokens) >= MIN_TOKENS),
            key=lambda slot: slot.last_used,
            reverse=True,
        )
        started = time.monotonic()
        shutil.rmtree(target, ignore_errors=True)
        written = used = 0
        saved: list[tuple[int, Slot]] = []  # (file number, slot) of what is on disk
        for slot in keep:
            base, shared = _base_for(model, slot, saved)
            state = self._export(model, slot, shared)
            if state is None:
                continue
            if used + len(state) > self.budget_bytes:
                log.info(
                    "not saving slot %d's KV cache (%d tokens, %.0f MB): over "
                    "model.prefix_cache_mb; raise it to keep this cache across restarts",
                    slot.index,
                    len(slot.tokens),
                    len(state) / 1e6,
                )
                continue
            try:
                _write(target / f"slot-{written}.kv", slot, state, base, shared)
            except OSError as exc:
                log.warning("cannot save KV caches to %s: %s", target, exc)
                break
            saved.append((written, slot))
            written += 1
            used += len(state)
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

    def _export(self, model: LoadedModel, slot: Slot, skip: int) -> memoryview | None:
        """Slot's KV state, without its first `skip` positions (those are saved elsewhere)."""
        context = model.context
        seq = slot.index
        if skip:
            # The tail alone, in the scratch sequence: seq_cp shares the cells, nothing moves.
            seq = model.scratch_seq
            context.seq_rm(seq, -1, -1)
            context.seq_cp(slot.index, seq, skip, -1)
        try:
            state = context.seq_state(seq)
        finally:
            if skip:
                context.seq_rm(seq, -1, -1)
        if state is None:
            log.warning("llama.cpp could not export slot %d's KV cache", slot.index)
        return state

    def restore(self, model: LoadedModel, slots: Sequence[Slot]) -> int:
        """Read saved states into empty slots; the count restored. Bad files are deleted."""
        if not self.enabled or not persistable(model):
            return 0
        try:
            source = self.directory / model_key(model)
            # Numeric order: a slot's base is always saved before it.
            files = sorted(source.glob("slot-*.kv"), key=_file_number)
        except OSError:
            return 0
        empty = iter([slot for slot in slots if not slot.tokens])
        placed: dict[int, Slot] = {}  # file number -> the slot it went to
        restored = 0
        started = time.monotonic()
        for path in files:
            try:
                number = _file_number(path)
                tokens, state, base, shared = _read(path)
            except (OSError, ValueError) as exc:
                log.warning("discarding saved KV cache %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            donor = placed.get(base) if base is not None else None
            if len(tokens) >= model.n_ctx or (base is not None and donor is None):
                path.unlink(missing_ok=True)  # too long now, or its base is gone
                continue
            slot = next(empty, None)
            if slot is None:
                break
            if not _load(model, slot, state, donor, shared, len(tokens)):
                log.warning("llama.cpp refused saved KV cache %s; deleting it", path)
                path.unlink(missing_ok=True)
                continue
            slot.tokens, slot.restored = tokens, True
            placed[number] = slot
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


def _file_number(path: Path) -> int:
    digits = path.stem.removeprefix("slot-")
    return int(digits) if digits.isdigit() else -1


def _base_for(
    model: LoadedModel, slot: Slot, saved: list[tuple[int, Slot]]
) -> tuple[int | None, int]:
    """The saved slot whose cells `slot` shares the longest prefix of, and that length."""
    best: tuple[int | None, int] = (None, 0)
    for number, other in saved:
        common = model.cells.common(slot.index, other.index)
        if common > best[1]:
            best = (number, common)
    return best if best[1] >= MIN_TOKENS else (None, 0)


def _load(
    model: LoadedModel,
    slot: Slot,
    state: bytearray,
    donor: Slot | None,
    shared: int,
    length: int,
) -> bool:
    """Read one saved state into `slot`, sharing `donor`'s first `shared` cells into it."""
    context = model.context
    loaded = context.load_seq_state(slot.index, state)
    if loaded and donor is not None:
        context.seq_cp(donor.index, slot.index, 0, shared)
    first = context.seq_pos_min(slot.index)
    last = context.seq_pos_max(slot.index)
    if not loaded or first != 0 or last + 1 != length:
        model.forget(slot.index, 0)
        return False
    # The books: the donor's cells, then the ones just read.
    if donor is not None:
        model.cells.share(donor.index, slot.index, shared)
    model.cells.append(slot.index, length - shared)
    return True


def _write(path: Path, slot: Slot, state: memoryview, base: int | None, shared: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"tokens": slot.tokens, "base": base, "shared": shared}).encode()
    partial = path.with_suffix(".partial")
    with partial.open("wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<QQ", len(meta), len(state)))
        f.write(meta)
        f.write(state)
    os.replace(partial, path)


def _read(path: Path) -> tuple[list[int], bytearray, int | None, int]:
    """Tokens, KV state, the file number of its base (or None) and the positions shared."""
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
        if not isinstance(meta, dict):
            raise ValueError("bad metadata")
        tokens = meta.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ValueError("bad token list")
        base, shared = meta.get("base"), meta.get("shared", 0)
        if base is not None and not isinstance(base, int):
            raise ValueError("bad base")
        if not isinstance(shared, int) or not 0 <= shared < max(len(tokens), 1):
            raise ValueError("bad shared length")
        state = bytearray(state_len)
        if f.readinto(state) != state_len:
            raise ValueError("truncated state")
    return tokens, state, base, shared


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
