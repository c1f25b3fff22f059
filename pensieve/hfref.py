"""Models named by their Hugging Face address: parsing `user/repo[:QUANT]`, `user/repo/file.gguf`
and `hf:…` config values, choosing a repository's files as llama-server's `-hf` does, and
finding a pulled model in the shared Hugging Face cache.

Stdlib only: the daemon resolves config values with it (reading the cache's layout, never the
network), and `pensievectl pull` plans its downloads with it.

The cache layout is huggingface_hub's: `<cache>/models--USER--REPO/` holds `blobs/<etag>`,
`refs/<revision>` (a commit hash) and `snapshots/<commit>/<file>` (a link to the blob).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

HF_PREFIX = "hf:"
DEFAULT_REVISION = "main"
# llama-server's default when no quant is named: the first of these that the repo has.
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")
# Files in a GGUF repo that are not the language model (llama.cpp's list).
_NOT_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REF = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?::(?P<quant>[A-Za-z0-9_]+))?$")
_FILE_REF = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})/(?P<file>(?:{_NAME}/)*{_NAME}\.gguf)$")


class RefError(ValueError):
    """A model name that is neither a Hugging Face address nor a catalog name."""


class NoGgufError(ValueError):
    """The repository has no GGUF model file."""


class UnknownQuantError(ValueError):
    """The repository has no file of the quant (or name) asked for; `available`: those it has."""

    def __init__(self, message: str, available: list[str]) -> None:
        super().__init__(message)
        self.available = available


@dataclass(frozen=True)
class HfRef:
    """`repo` with either a quant tag (None: llama-server's default choice) or one file."""

    repo: str
    quant: str | None = None
    file: str | None = None

    def __str__(self) -> str:
        if self.file:
            return f"{self.repo}/{self.file}"
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


def parse_ref(text: str) -> HfRef:
    """`user/repo`, `user/repo:QUANT` or `user/repo/path/file.gguf`, with or without `hf:`."""
    value = text.strip().removeprefix(HF_PREFIX)
    if match := _FILE_REF.match(value):
        return HfRef(match["repo"], file=match["file"])
    if match := _REF.match(value):
        return HfRef(match["repo"], quant=match["quant"].upper() if match["quant"] else None)
    raise RefError(
        f"{text!r} is not a model name: give a Hugging Face address (user/repo, "
        "user/repo:Q4_K_M or user/repo/file.gguf) or a catalog name (pensievectl pull --list)"
    )


# ---- choosing files (llama.cpp common/download.cpp, `-hf`) -------------------------------------


@dataclass(frozen=True)
class SplitInfo:
    prefix: str  # the name without `.gguf` and the split suffix, quant tag included
    tag: str  # the quant tag, upper case ("" when the name has none)
    index: int
    count: int


def split_info(path: str) -> SplitInfo | None:
    if not path.lower().endswith(".gguf"):
        return None
    prefix, index, count = path[: -len(".gguf")], 1, 1
    if match := _SPLIT.match(prefix):
        prefix, index, count = match[1], int(match[2]), int(match[3])
    tag = _TAG.search(prefix)
    return SplitInfo(prefix, tag[1].upper() if tag else "", index, count)


def is_model_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.lower().endswith(".gguf") and not any(word in name for word in _NOT_MODEL)


def _first_part(path: str) -> bool:
    info = split_info(path)
    return info is not None and (info.count <= 1 or info.index == 1)


def quants_of(files: list[str]) -> list[str]:
    """The quant tags a repository's model files offer, in file order."""
    tags: list[str] = []
    for path in files:
        info = split_info(path)
        if info and is_model_file(path) and _first_part(path) and info.tag and info.tag not in tags:
            tags.append(info.tag)
    return tags


@dataclass(frozen=True)
class Plan:
    """What to fetch for a ref: the model's file(s), in split order, and its mmproj companion."""

    model_files: list[str]
    mmproj: str | None

    @property
    def primary(self) -> str:
        return self.model_files[0]


def select_files(files: list[str], ref: HfRef) -> Plan:
    """The files llama-server's `-hf REF` would download from a repo holding `files`."""
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if ref.file is not None:
        if ref.file not in files:
            raise UnknownQuantError(f"{ref.repo} has no file {ref.file}", ggufs)
        primary = ref.file
    else:
        best = _best_model(files, ref.quant)
        if best is None:
            if not any(is_model_file(f) for f in files):
                raise NoGgufError(f"{ref.repo} has no GGUF model file")
            raise UnknownQuantError(f"{ref.repo} has no {ref.quant} file", quants_of(files))
        primary = best
    return Plan(_split_parts(files, primary), _best_mmproj(files, primary))


def _best_model(files: list[str], quant: str | None) -> str | None:
    for tag in [quant] if quant else list(DEFAULT_QUANTS):
        pattern = re.compile(re.escape(tag) + "[.-]", re.IGNORECASE)
        for path in files:
            if is_model_file(path) and pattern.search(path) and _first_part(path):
                return path
    if quant is None:
        return next((f for f in files if is_model_file(f) and _first_part(f)), None)
    return None


def _split_parts(files: list[str], primary: str) -> list[str]:
    info = split_info(primary)
    if info is None or info.count <= 1:
        return [primary]
    parts = []
    for path in files:
        other = split_info(path)
        if other and other.count == info.count and other.prefix == info.prefix:
            parts.append((other.index, path))
    return [path for _, path in sorted(parts)]


def _bits(tag: str) -> int:
    digits = re.search(r"[0-9]+", tag)
    return int(digits[0]) if digits else 0


def _best_mmproj(files: list[str], model: str) -> str | None:
    """The mmproj file beside the model: deepest shared folder, then closest quant bits."""
    model_dir = model.split("/")[:-1]
    model_info = split_info(model)
    model_bits = _bits(model_info.tag) if model_info else 0
    best: tuple[int, int, str] | None = None
    for path in files:
        if not path.lower().endswith(".gguf") or "mmproj" not in path:
            continue
        sib_dir = path.split("/")[:-1]
        if sib_dir != model_dir[: len(sib_dir)]:
            continue
        info = split_info(path)
        diff = abs((_bits(info.tag) if info else 0) - model_bits)
        key = (-len(sib_dir), diff, path)
        if best is None or key[:2] < best[:2]:
            best = key
    return best[2] if best else None


# ---- the shared cache --------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """huggingface_hub's cache: $HF_HUB_CACHE, else $HF_HOME/hub, else the XDG cache's."""
    if env := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def repo_folder(repo: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache_dir()) / ("models--" + repo.replace("/", "--"))


def snapshot_dir(repo: str, revision: str = DEFAULT_REVISION, cache: Path | None = None) -> Path:
    """The snapshot a revision points at (its commit's folder; it may not exist)."""
    folder = repo_folder(repo, cache)
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    return folder / "snapshots" / commit


def snapshot_files(snapshot: Path) -> list[str]:
    """Every complete file of a snapshot, as repo-relative paths (dangling links left out)."""
    if not snapshot.is_dir():
        return []
    return sorted(
        str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file() and not p.is_dir()
    )


def cached_model(ref: HfRef, cache: Path | None = None) -> Path | None:
    """The pulled model file `ref` names (the first part of a split one), or None when it, or
    any of its parts, is not in the cache."""
    snapshot = snapshot_dir(ref.repo, cache=cache)
    try:
        plan = select_files(snapshot_files(snapshot), ref)
    except ValueError:
        return None
    info = split_info(plan.primary)
    if info is not None and len(plan.model_files) != info.count:
        return None  # a split model with a part missing
    return snapshot / plan.primary


# ---- config values ------------------------------------------------------------------------------

# Config values naming a model that is not pulled resolve to a path under this folder name, so
# that the load's "file not found" can say which `pensievectl pull` brings it.
_MISSING_DIR = "(not pulled)"


def model_file(value: str) -> Path:
    """The GGUF file a config's model value names: a path as given, or the pulled file of an
    `hf:` address or a catalog name, or (not pulled) a placeholder that `missing_ref` knows."""
    from pensieve.catalog import find_entry

    entry = find_entry(value)
    if entry is not None:
        ref, pull_name = entry.ref, entry.name
    elif value.startswith(HF_PREFIX):
        try:
            ref = parse_ref(value)
        except RefError:
            return Path(value)
        pull_name = str(ref)
    else:
        return Path(value).expanduser()
    found = cached_model(ref)
    if found is not None:
        return found
    return repo_folder(ref.repo) / _MISSING_DIR / pull_name.replace("/", "%2F")


def missing_ref(path: Path) -> str | None:
    """For a placeholder from `model_file`: the name to give `pensievectl pull`."""
    if path.parent.name != _MISSING_DIR:
        return None
    return path.name.replace("%2F", "/")


def missing_message(path: Path) -> str | None:
    name = missing_ref(path)
    return None if name is None else f"missing: run pensievectl pull {name}"
