"""`pensievectl pull`: fetch a GGUF model (and its split parts and mmproj) from the Hugging Face
Hub into the shared Hugging Face cache, where the daemon finds `hf:` and catalog names.

huggingface_hub does the talking: the repo listing, each file's metadata (ETag, size, commit,
redirects, HF_ENDPOINT, HF_TOKEN) and the HTTP transfer with its retries, or Xet where the file
is Xet-stored and hf_xet is installed. Two things are added around its transfer, because its
own `hf_hub_download` discards an interrupted file and checks only the size: the partial file
keeps a stable name in the cache (`blobs/<etag>.incomplete`) so that the next pull resumes it
with a Range request, and the finished file's sha256 is compared with the ETag (an LFS file's
ETag is its sha256) before it is linked into the snapshot; a file that does not match is
deleted. Nothing is presented as a model until every part of it is complete and checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pensieve.catalog import (
    ASK_ABOVE_BYTES,
    GB,
    CatalogEntry,
    best_fit,
    budget_bytes,
    entries,
    find_entry,
    why_not,
)
from pensieve.exitcodes import CtlExit
from pensieve.hfref import (
    DEFAULT_REVISION,
    HfRef,
    NoGgufError,
    Plan,
    UnknownQuantError,
    missing_ref,
    parse_ref,
    repo_folder,
    select_files,
)
from pensievectl.context import CommandContext
from pensievectl.errors import PullError

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _human(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1000**2:.1f} MB"


# ---- choosing what to pull ----------------------------------------------------------------------


def memory_budget(ctx: CommandContext) -> tuple[int, str]:
    """The daemon's memory budget for this config, and where it comes from."""
    import psutil

    physical = int(psutil.virtual_memory().total)
    configured = _configured_budget_mb(ctx)
    budget = budget_bytes(configured, physical)
    source = (
        "model.memory_budget_mb"
        if configured is not None
        else f"half of this machine's {physical / GB:.0f} GB"
    )
    return budget, source


def _configured_budget_mb(ctx: CommandContext) -> int | None:
    from pensieve.config import ConfigError, load_config_file

    try:
        config = load_config_file(ctx.config_path, missing_ok=ctx.config_may_be_missing)
    except (ConfigError, OSError):
        return None
    return config.model.memory_budget_mb


def format_list(budget: int, source: str) -> str:
    lines = [f"memory budget {_human(budget)} ({source})", ""]
    rows = [["NAME", "FITS", "DOWNLOAD", "MEMORY", "CONTEXT", "DIALECT", "ADDRESS"]]
    reasons = []
    for e in entries():
        reason = why_not(e, budget)
        rows.append(
            [
                e.name,
                "yes" if reason is None else "no",
                _human(e.size_gb * GB),
                _human(e.memory_bytes),
                f"{e.context // 1024}k",
                e.dialect,
                e.address,
            ]
        )
        if reason:
            reasons.append(f"{e.name}: {reason}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines + (["", *reasons] if reasons else []))


def resolve(text: str) -> tuple[HfRef, CatalogEntry | None]:
    entry = find_entry(text)
    if entry is not None:
        return entry.ref, entry
    try:
        return parse_ref(text), None
    except ValueError as exc:
        raise PullError(str(exc)) from None


# ---- talking to the Hub -------------------------------------------------------------------------


def _hub_error(exc: BaseException, repo: str) -> PullError:
    """One line for what huggingface_hub raised."""
    import httpx2
    from huggingface_hub import errors

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if isinstance(exc, errors.GatedRepoError) or (
        isinstance(exc, errors.HfHubHTTPError)
        and exc.response is not None
        and exc.response.status_code in (401, 403)
    ):
        return PullError(
            f"{repo} is gated or private: accept its terms on its Hub page, then set HF_TOKEN "
            "to a token that may read it"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return PullError(f"{repo} does not exist on {endpoint} (check the name)")
    if isinstance(exc, errors.RevisionNotFoundError | errors.RemoteEntryNotFoundError):
        return PullError(f"{repo}: {exc.__class__.__name__}: the file or revision is gone")
    if isinstance(exc, httpx2.TransportError | errors.OfflineModeIsEnabled):
        return PullError(
            f"cannot reach {endpoint}: check the network (or HF_ENDPOINT, HF_HUB_OFFLINE)"
        )
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return PullError(f"{endpoint} answered {status} for {repo}; try again later")
    return PullError(f"{repo}: {exc}")


def plan_pull(ref: HfRef) -> tuple[str, Plan]:
    """The commit `main` is at and the files to fetch."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(ref.repo, revision=DEFAULT_REVISION)
    except Exception as exc:  # every Hub failure becomes one line
        raise _hub_error(exc, ref.repo) from exc
    files = [s.rfilename for s in info.siblings or []]
    try:
        plan = select_files(files, ref)
    except UnknownQuantError as exc:
        have = ", ".join(exc.available) or "none"
        raise PullError(f"{exc}; it has: {have}") from None
    except NoGgufError as exc:
        raise PullError(f"{exc}: pull a repository of GGUF files (names end in .gguf)") from None
    if info.sha is None:
        raise PullError(f"{ref.repo}: the Hub gave no commit for {DEFAULT_REVISION}")
    return info.sha, plan


def _progress_class(ctx: CommandContext) -> type[Any] | None:
    """A byte progress bar (size, rate, time left) on a terminal; none otherwise."""
    from huggingface_hub.utils.tqdm import tqdm

    if not ctx.err.isatty():
        return None

    class Bar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("file", ctx.err)
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    return Bar


class Interrupted(PullError):
    """Ctrl-C during a download: the partial file stays for the next pull."""


def fetch(
    ctx: CommandContext, repo: str, filename: str, commit: str, cache: Path | None = None
) -> Path:
    """One file into the cache (resumed, checked); its snapshot path."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    folder = repo_folder(repo, cache)
    pointer = folder / "snapshots" / commit / filename
    if pointer.is_file():
        ctx.note(f"{filename}: already pulled")
        return pointer
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=commit))
    except Exception as exc:
        raise _hub_error(exc, repo) from exc
    if meta.etag is None:
        raise PullError(f"{repo}/{filename}: the Hub gave no ETag, so it cannot be checked")
    blob = folder / "blobs" / meta.etag
    if not blob.is_file():
        _download(ctx, repo, filename, meta, blob)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.unlink(missing_ok=True)
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    return pointer


def _download(
    ctx: CommandContext, repo: str, filename: str, meta: HfFileMetadata, blob: Path
) -> None:
    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob.name + ".incomplete")
    with _exclusive(blob.with_name(blob.name + ".pull-lock"), filename):
        _transfer(ctx, repo, filename, meta, blob, partial)


@contextlib.contextmanager
def _exclusive(lock_path: Path, filename: str) -> Iterator[None]:
    """One pull per file at a time: two appending to one partial file would spoil it."""
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(
                f"another pensievectl pull is downloading {filename}; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def _transfer(
    ctx: CommandContext, repo: str, filename: str, meta: HfFileMetadata, blob: Path, partial: Path
) -> None:
    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils._headers import build_hf_headers
    from huggingface_hub.utils._runtime import is_xet_available

    have = partial.stat().st_size if partial.exists() else 0
    size = meta.size
    if size is not None and have > size:
        partial.unlink()
        have = 0
    need = (size or 0) - have
    free = shutil.disk_usage(blob.parent).free
    if need > free:
        raise PullError(
            f"{filename} needs {_human(need)} more and {blob.parent} has {_human(free)} free: "
            "make room (or set HF_HUB_CACHE to a bigger disk) and pull again"
        )
    if have:
        ctx.note(f"{filename}: resuming at {_human(have)} of {_human(size or 0)}")
    started = time.monotonic()
    try:
        if (
            meta.xet_file_data is not None
            and is_xet_available()
            and not constants.HF_HUB_DISABLE_XET
        ):
            # Xet fetches by chunk and keeps them in its own chunk cache, so a retry after an
            # interruption fetches only what is missing; the blob it writes is checked below.
            from huggingface_hub import hf_hub_download

            hf_hub_download(repo, filename, tqdm_class=_progress_class(ctx))
            partial = blob
        else:
            with partial.open("ab") as f:
                http_get(
                    meta.location,
                    f,
                    resume_size=have,
                    headers=_headers_for(meta.location, build_hf_headers()),
                    expected_size=size,
                    displayed_filename=filename,
                    tqdm_class=_progress_class(ctx),
                )
    except KeyboardInterrupt:
        kept = partial.stat().st_size if partial.exists() else 0
        raise Interrupted(
            f"interrupted: {_human(kept)} of {filename} kept in {partial}; run the same "
            "pensievectl pull again to resume"
        ) from None
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            raise PullError(
                f"the disk filled up while writing {filename}: make room and pull again to resume"
            ) from None
        if "Consistency check failed" in str(exc):
            raise PullError(
                f"{filename} arrived with the wrong size; pull again to resume"
            ) from None
        raise _hub_error(exc, repo) from exc
    except Exception as exc:
        raise _hub_error(exc, repo) from exc
    _check(partial, meta.etag or "", filename)
    if partial != blob:
        partial.replace(blob)
    elapsed = max(time.monotonic() - started, 1e-6)
    done = blob.stat().st_size
    ctx.note(f"{filename}: {_human(done)} in {elapsed:.1f} s ({_human((done - have) / elapsed)}/s)")


def _headers_for(url: str, headers: dict[str, str]) -> dict[str, str]:
    """The token goes to the Hub only, never to the storage a file redirects to."""
    from huggingface_hub import constants

    hub = urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).netloc
    if urlsplit(url).netloc != hub:
        return {k: v for k, v in headers.items() if k.lower() != "authorization"}
    return headers


def _check(partial: Path, etag: str, filename: str) -> None:
    """The finished file's sha256 against the ETag (an LFS file's sha256); a mismatch deletes it."""
    if not _SHA256.match(etag):
        return  # a small git-stored file: its ETag is a git hash, and the size was checked
    digest = hashlib.sha256()
    with partial.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != etag:
        partial.unlink()
        raise PullError(
            f"{filename} does not match its checksum (sha256 {digest.hexdigest()[:12]}…, the Hub "
            f"says {etag[:12]}…): deleted it; pull again to download it afresh"
        )


def pull(ctx: CommandContext, ref: HfRef, cache: Path | None = None) -> Path:
    """Fetch `ref`'s files; the model's path (its first part when split)."""
    commit, plan = plan_pull(ref)
    wanted = plan.model_files + ([plan.mmproj] if plan.mmproj else [])
    paths = [fetch(ctx, ref.repo, name, commit, cache) for name in wanted]
    refs = repo_folder(ref.repo, cache) / "refs" / DEFAULT_REVISION
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(commit)
    return paths[0]


# ---- the command --------------------------------------------------------------------------------


def _confirm(ctx: CommandContext, question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    ctx.err.write(f"{question} [y/N] ")
    ctx.err.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def run_pull(ctx: CommandContext, text: str | None, yes: bool, show_list: bool) -> int:
    if show_list:
        ctx.say(format_list(*memory_budget(ctx)))
        return CtlExit.OK
    if text is None:
        missing = configured_missing(ctx)
        if missing:
            # The config names models that are not here yet: those are what to pull.
            for name in missing:
                ctx.say(str(pull(ctx, resolve(name)[0])))
            ctx.note("pulled what the config names; run pensievectl reload to load it")
            return CtlExit.OK
        text = _propose(ctx, yes)
    ref, entry = resolve(text)
    path = pull(ctx, ref)
    name = entry.name if entry else f"hf:{ref}"
    ctx.say(str(path))
    ctx.note(f'pulled; to serve it, set model.model_path to "{name}" and run pensievectl reload')
    return CtlExit.OK


def configured_missing(ctx: CommandContext) -> list[str]:
    """The names of the models the config names by name and that are not pulled."""
    from pensievectl.downloads import configured_paths

    names = [missing_ref(path) for path in configured_paths(ctx)]
    return list(dict.fromkeys(name for name in names if name))


def _propose(ctx: CommandContext, yes: bool) -> str:
    """The catalog model that best fits the memory budget, once the user agrees."""
    budget, source = memory_budget(ctx)
    entry = best_fit(budget)
    if entry is None:
        raise PullError(
            f"no catalog model fits the memory budget {_human(budget)} ({source}); "
            "see pensievectl pull --list"
        )
    size = int(entry.size_gb * GB)
    ctx.note(
        f"best fit for {_human(budget)} ({source}): {entry.name} ({entry.address}, "
        f"{_human(size)}, {entry.dialect}, {entry.context // 1024}k context)"
    )
    if size > ASK_ABOVE_BYTES and not yes and not _confirm(ctx, f"download {_human(size)}?"):
        raise PullError(f"not downloaded: run pensievectl pull {entry.name} --yes to fetch it")
    return entry.name
