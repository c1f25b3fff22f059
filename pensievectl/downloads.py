"""The models in the Hugging Face cache: what `pensievectl models` lists beside the configured
ones, and what `pensievectl rm` deletes (never one the config uses)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pensieve.catalog import entries
from pensieve.exitcodes import CtlExit
from pensieve.gguf import read_gguf_metadata
from pensieve.hfref import (
    HfRef,
    hub_cache_dir,
    is_model_file,
    model_file,
    repo_folder,
    select_files,
    snapshot_dir,
    snapshot_files,
    split_info,
)
from pensievectl.context import CommandContext
from pensievectl.errors import PullError
from pensievectl.pull import resolve
from pensievectl.status import human_bytes

# Markers of each family's tool-call syntax in a chat template, most specific first: a guess
# for the listing only (the daemon detects the dialect it uses and `status` names it).
_DIALECT_MARKERS = (
    ("dsml_token + 'function_calls", "deepseek-v3.2"),  # V4 names its block tool_calls
    ("dsml_token", "deepseek-v4"),
    ("<|channel|>", "harmony"),
    ("<function=", "qwen3-xml"),
    ("<arg_key>", "glm"),
    ("]<]minimax[>[", "minimax-m3"),  # M3's namespace token; M2 writes <minimax:tool_call>
    ("<invoke name", "minimax"),
    ("[TOOL_CALLS]", "mistral"),
    ("tool▁calls▁begin", "deepseek"),
    ("<|tool_calls_section_begin|>", "kimi-k2"),
    ("<|tool_call>", "gemma4"),
    ("<tool_call>", "hermes"),
    ("<|python_tag|>", "llama3"),
)


@dataclass(frozen=True)
class Downloaded:
    repo: str
    path: Path  # the model file (the first part of a split one)
    size: int  # all parts
    quant: str
    architecture: str
    context: str
    dialect: str


def dialect_of(repo: str, file: str, template: str) -> str:
    for entry in entries():
        if entry.repo == repo and entry.file == file:
            return entry.dialect
    for marker, dialect in _DIALECT_MARKERS:
        if marker in template:
            return f"{dialect}?"
    return "-"


def downloaded(cache: Path | None = None) -> list[Downloaded]:
    found = []
    for folder in sorted((cache or hub_cache_dir()).glob("models--*--*")):
        repo = folder.name.removeprefix("models--").replace("--", "/", 1)
        snapshot = snapshot_dir(repo, cache=cache)
        files = snapshot_files(snapshot)
        for name in files:
            info = split_info(name)
            if info is None or not is_model_file(name) or info.index != 1:
                continue
            parts = select_files(files, HfRef(repo, file=name)).model_files
            if len(parts) != info.count:
                continue  # a split model with a part missing is not a model yet
            path = snapshot / name
            try:
                meta = read_gguf_metadata(path)
            except (OSError, ValueError):
                meta = {}
            arch = meta.get("general.architecture", "?")
            found.append(
                Downloaded(
                    repo=repo,
                    path=path,
                    size=sum((snapshot / p).stat().st_size for p in parts),
                    quant=info.tag or "-",
                    architecture=arch,
                    context=meta.get(f"{arch}.context_length", "?"),
                    dialect=dialect_of(repo, name, meta.get("tokenizer.chat_template", "")),
                )
            )
    return found


def format_downloaded(models: list[Downloaded]) -> str:
    where = hub_cache_dir()
    if not models:
        return f"downloaded: none in {where} (pensievectl pull --list)"
    rows = [["DOWNLOADED", "SIZE", "QUANT", "ARCH", "CONTEXT", "DIALECT", "PATH"]]
    for m in models:
        name = f"{m.repo}/{m.path.name}"
        rows.append(
            [name, human_bytes(m.size), m.quant, m.architecture, m.context, m.dialect, str(m.path)]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def configured_paths(ctx: CommandContext) -> dict[Path, str]:
    """The model files the config file names, with the key that names each."""
    from pensieve.config import ConfigError, alias_target, load_config_file

    try:
        config = load_config_file(ctx.config_path, missing_ok=ctx.config_may_be_missing)
    except (ConfigError, OSError):
        return {}
    used = {}
    if config.model.model_path:
        used[model_file(config.model.model_path)] = "model.model_path"
    for pattern, value in config.model.aliases.items():
        used[model_file(alias_target(value).model_path)] = f"model.aliases.{pattern}"
    return used


def run_rm(ctx: CommandContext, text: str) -> int:
    ref, _ = resolve(text)
    snapshot = snapshot_dir(ref.repo)
    files = snapshot_files(snapshot)
    try:
        plan = select_files(files, ref)
    except ValueError:
        raise PullError(f"{text} is not downloaded (pensievectl models lists what is)") from None
    wanted = plan.model_files + ([plan.mmproj] if plan.mmproj else [])
    used = configured_paths(ctx)
    for name in plan.model_files:
        key = used.get(snapshot / name)
        if key is not None:
            raise PullError(
                f"{text} is in use ({key} in {ctx.config_path}): change the config first"
            )
    freed = 0
    for name in wanted:
        freed += _remove(snapshot / name)
    _prune(repo_folder(ref.repo))
    ctx.say(f"removed {text} ({human_bytes(freed)})")
    return CtlExit.OK


def _remove(pointer: Path) -> int:
    """Unlink a snapshot file and its blob unless another snapshot links to the blob too."""
    blob = pointer.resolve()
    size = blob.stat().st_size if blob.exists() else 0
    pointer.unlink(missing_ok=True)
    folder = blob.parent.parent
    still_used = any(
        p.is_symlink() and p.resolve() == blob for p in (folder / "snapshots").rglob("*")
    )
    if blob.parent.name == "blobs" and not still_used:
        blob.unlink(missing_ok=True)
        return size
    return 0


def _prune(folder: Path) -> None:
    """Drop empty folders, and the repository's whole folder once no snapshot holds a file."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    snapshots = folder / "snapshots"
    if not snapshots.exists() or not any(p.is_file() for p in snapshots.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)
