"""The catalog of coding models `pensievectl pull NAME` knows (`catalog.toml` beside this file),
and which of them fit this machine's memory budget."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from importlib import resources

from pensieve.hfref import HfRef

GB = 1000**3
# The daemon's default budget is this fraction of physical memory
# (pensieved.engine.memory.DEFAULT_BUDGET_FRACTION; a test keeps the two equal).
DEFAULT_BUDGET_FRACTION = 0.5
# Ask before downloading more than this without --yes.
ASK_ABOVE_BYTES = 2 * GB


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo: str
    quant: str
    file: str
    size_gb: float
    memory_gb: float
    context: int
    dialect: str
    min_memory_gb: int
    caveats: str

    @property
    def ref(self) -> HfRef:
        return HfRef(self.repo, file=self.file)

    @property
    def address(self) -> str:
        return f"{self.repo}:{self.quant}"

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GB)


@functools.cache
def entries() -> tuple[CatalogEntry, ...]:
    text = resources.files("pensieve").joinpath("catalog.toml").read_text()
    return tuple(CatalogEntry(**item) for item in tomllib.loads(text)["model"])


def find_entry(name: str) -> CatalogEntry | None:
    return next((e for e in entries() if e.name == name), None)


def budget_bytes(memory_budget_mb: int | None, physical: int) -> int:
    """The daemon's memory budget: model.memory_budget_mb, else half of physical memory."""
    if memory_budget_mb is not None:
        return memory_budget_mb * 1024 * 1024
    return int(physical * DEFAULT_BUDGET_FRACTION)


def why_not(entry: CatalogEntry, budget: int) -> str | None:
    """None when `entry` fits `budget`, else why not."""
    if entry.memory_bytes <= budget:
        return None
    return (
        f"needs {entry.memory_gb:.1f} GB with a {entry.context // 1024}k context, the budget is "
        f"{budget / GB:.1f} GB (model.memory_budget_mb)"
    )


def best_fit(budget: int) -> CatalogEntry | None:
    """The largest model that fits: the catalog lists them from small to large."""
    fitting = [e for e in entries() if why_not(e, budget) is None]
    return max(fitting, key=lambda e: e.memory_gb) if fitting else None


def memory_table() -> str:
    """The Markdown table of docs/models.md: which model for which machine."""
    lines = [
        "| memory | model (`pensievectl pull NAME`) | download | dialect | context | caveats |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    tiers = (16, 32, 64, 128)
    for tier in tiers:
        for e in entries():
            if min(t for t in tiers if t >= e.min_memory_gb) == tier:
                lines.append(
                    f"| {tier} GB | `{e.name}` ([{e.address}](https://huggingface.co/{e.repo})) "
                    f"| {e.size_gb:.1f} GB | {e.dialect} | {e.context // 1024}k | {e.caveats} |"
                )
    return "\n".join(lines)


def write_table(path: str) -> None:
    """Replace the table between docs/models.md's markers with `memory_table()`."""
    from pathlib import Path

    doc = Path(path)
    head, rest = doc.read_text().split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    doc.write_text(f"{head}{TABLE_START}\n{memory_table()}\n{TABLE_END}{tail}")


TABLE_START, TABLE_END = "<!-- catalog table -->", "<!-- end -->"

if __name__ == "__main__":
    import sys

    write_table(sys.argv[1] if len(sys.argv) > 1 else "docs/models.md")
