"""The real chat templates that llama.cpp keeps in models/templates/, one Jinja file a model.

They live beside the repository, in ../shared/fixtures/chat-templates/ (vendors' text: read from
there, never copied in); PENSIEVE_TEMPLATE_FIXTURES points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.claude_code_captures import REPO

TEMPLATES = Path(
    os.environ.get(
        "PENSIEVE_TEMPLATE_FIXTURES", REPO.parent / "shared" / "fixtures" / "chat-templates"
    )
)


def template_files() -> list[Path]:
    return sorted(TEMPLATES.glob("*.jinja")) if TEMPLATES.is_dir() else []
