"""The migration guides in docs/migration/ are side by side, and their links resolve.

Their ```python blocks are run by tests/test_docs.py (in order, in one namespace per guide, a reader
running them top to bottom); ```text blocks hold the upstream code being migrated from.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIGRATION = ROOT / "docs" / "migration"
GUIDES = [
    "from_neural_compressor.md",
    "from_modelopt_gradnas.md",
    "from_sparselearning.md",
    "from_gradiend.md",
    "from_torch_prune.md",
]
_FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)


def _blocks(name: str, lang: str) -> list[str]:
    text = (MIGRATION / name).read_text(encoding="utf-8")
    return [body for kind, body in _FENCE.findall(text) if kind == lang]


@pytest.mark.parametrize("name", GUIDES)
def test_guide_is_side_by_side(name):
    text = (MIGRATION / name).read_text(encoding="utf-8")
    assert _blocks(name, "text"), f"{name} should show the upstream code in a ```text block"
    kinds = {kind for kind, _ in _FENCE.findall(text)}
    assert kinds <= {"text", "python"}, f"{name}: unexpected code block kinds {kinds - {'text', 'python'}}"
    assert text.count("```") % 2 == 0, f"{name}: an unclosed code fence"


def test_index_lists_every_guide_and_links_resolve():
    index = (MIGRATION / "README.md").read_text(encoding="utf-8")
    for name in GUIDES:
        assert f"]({name})" in index, f"docs/migration/README.md does not link {name}"
    for page in ["README.md", *GUIDES]:
        text = (MIGRATION / page).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (MIGRATION / target).resolve().exists(), f"{page} links a missing file: {target}"


def test_in_page_anchors_resolve():
    def slug(heading: str) -> str:      # GitHub's anchor for a heading
        s = heading.strip().lower()
        s = re.sub(r"[^\w\- ]", "", s)
        return s.replace(" ", "-")

    for page in GUIDES:
        text = (MIGRATION / page).read_text(encoding="utf-8")
        prose = _FENCE.sub("", text)
        anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", prose, flags=re.M)}
        for anchor in re.findall(r"\]\(#([^)]+)\)", text):
            assert anchor in anchors, f"{page} links a missing section #{anchor}"
