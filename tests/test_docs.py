"""README.md, docs/ and the READMEs under configs/: every relative link and image resolves, every anchor names a heading
of its page, and every
script / config path in their command blocks exists (a moved file breaks this test, not a reader's first try)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md")), *sorted((ROOT / "configs").glob("**/*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*```[^\n]*\n(.*?)^\s*```", re.S | re.M)
# Repository paths a command names: scripts and configs (outputs such as runs/... are made by the commands).
COMMAND_PATH = re.compile(
    r"(?<![\w/.-])((?:distill|scripts|benchmarks|configs|teachers/assets|data_gen|students|teachers)/[\w./-]*\w)"
)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.M)}


def _links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(FENCE.sub("", page.read_text()))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_images_and_anchors_resolve(page):
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_in_command_blocks_exist(page):
    missing = []
    for block in FENCE.findall(page.read_text()):
        for path in COMMAND_PATH.findall(block):
            if "*" in path or "<" in path or path.rstrip("/").endswith(("RUN", "DIR")):
                continue
            if not (ROOT / path).exists():
                missing.append(path)
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {sorted(set(missing))}"


def test_the_checker_catches_a_broken_link_and_a_missing_path(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](#title) [bad](#nope) [gone](missing.md)\n\n```bash\npython distill/no_such_script.py\n```\n"
    )
    links = _links(page)
    assert links == ["#title", "#nope", "missing.md"]
    assert "title" in _anchors(page) and "nope" not in _anchors(page)
    block = FENCE.findall(page.read_text())[0]
    assert (
        COMMAND_PATH.findall(block) == ["distill/no_such_script.py"]
        and not (ROOT / "distill/no_such_script.py").exists()
    )
