"""The documentation: generated parts are fresh, links resolve, the README stays short.

The configuration reference (man/pensieve.json.5, the key list in docs/configuration.md) and
docs/exit-status.md are generated from pensieve/config.py and pensieve/exitcodes.py by
packaging/gen_config_ref.py; `make docs` rewrites them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pensieve.config import Config
from tests.test_packaging import REPO, load_script

gen_config_ref = load_script("gen_config_ref")

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
README_MAX_LINES = 350
# [text](target) outside code; a target with a scheme or a bare #anchor is not a file.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", list(gen_config_ref.outputs()), ids=lambda p: p.name)
def test_generated_reference_is_fresh(path: Path) -> None:
    expected = gen_config_ref.outputs()[path]
    name = path.relative_to(REPO)
    assert path.exists(), f"{name} is missing: run `make docs`"
    assert path.read_text(encoding="utf-8") == expected, (
        f"{name} is stale: a config key, its description or an exit code changed; "
        "run `make docs` and commit the result"
    )


def _every_key(model: type, prefix: str) -> list[str]:
    return [f"{prefix}.{name}" for name in model.model_fields]  # type: ignore[attr-defined]


def test_reference_documents_every_key() -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    man = gen_config_ref.MAN_PAGE.read_text(encoding="utf-8")
    for section, info in Config.model_fields.items():
        for key in _every_key(info.annotation, section):  # type: ignore[arg-type]
            assert f"#### `{key}`" in text, key
            assert f".B {gen_config_ref.roff(key)}" in man, key
    for key in ("model.upstreams.PATTERN.urls", "model.aliases.PATTERN.chat_template"):
        assert f"#### `{key}`" in text, key


def test_a_key_without_a_description_fails_the_generation() -> None:
    from pydantic import BaseModel, Field

    class Section(BaseModel):
        documented: int = Field(1, description="Has one.")
        bare: int = 2

    with pytest.raises(SystemExit, match=r"x\.bare has no description"):
        list(gen_config_ref.keys_of(Section, "x"))


def test_config_man_page_renders_without_warnings() -> None:
    man = shutil.which("man")
    if man is None or shutil.which("nroff") is None:
        pytest.skip("man/groff are not installed (`make packaging-deps` installs them)")
    env = {**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C"}
    done = subprocess.run(
        [man, "--warnings", "-l", str(gen_config_ref.MAN_PAGE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    assert "PENSIEVE.JSON(5)" in done.stdout and "server.api_key_file" in done.stdout


def _without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code removed (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", _without_fences(text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in _without_fences(path.read_text(encoding="utf-8")).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target} (no {resolved.relative_to(REPO)})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"broken links in {page.relative_to(REPO)}: {broken}"


def test_readme_is_short_enough_to_read_top_to_bottom() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference material "
        "into docs/ and link to it"
    )


def test_docs_index_lists_every_page() -> None:
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    for page in DOCS:
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not link {page.name}"
