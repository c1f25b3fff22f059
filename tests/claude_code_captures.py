"""The requests captured from the real Claude Code CLI, one folder per version.

They live beside the repository, in ../shared/fixtures/claude-code/ (Anthropic's prompt text:
read from there, never copied in). The top folder holds the first version's captures
(2.1.197), each version since has a folder of its own (`2.1.332/`); every file in either is
one request. Older files keep headers as an object, newer ones as a list of name-value pairs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(
    os.environ.get("PENSIEVE_CLAUDE_FIXTURES", REPO.parent / "shared" / "fixtures" / "claude-code")
)


@dataclass(frozen=True)
class Capture:
    path: Path
    method: str
    url: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def id(self) -> str:
        """`2.1.332/p-toolsearch-result`, or `bare` for a top-folder capture."""
        return self.path.relative_to(FIXTURES).with_suffix("").as_posix()

    @property
    def count_tokens(self) -> bool:
        return self.url.startswith("/v1/messages/count_tokens")


def _headers(raw: dict[str, str] | list[list[str]]) -> dict[str, str]:
    return dict(raw.items()) if isinstance(raw, dict) else {name: value for name, value in raw}


def load(path: Path) -> Capture:
    data = json.loads(path.read_text())
    return Capture(path, data["method"], data["path"], _headers(data["headers"]), data["body"])


def capture_files() -> list[Path]:
    """Every capture of every version: the top folder's, then each version folder's."""
    if not FIXTURES.is_dir():
        return []
    return sorted(FIXTURES.glob("*.json")) + sorted(FIXTURES.glob("*/*.json"))


def versions() -> list[str]:
    """The versions that have a folder of their own."""
    if not FIXTURES.is_dir():
        return []
    return sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and any(p.glob("*.json")))
