"""The README and docs cannot drift: their generated tables match the declarations, every relative link and
image exists, docs/index.md lists every page, and the README stays a short front door."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from elucidate.cli.docs import BLOCKS, render, update_docs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_generated_tables_are_up_to_date():
    stale = update_docs(ROOT, check=True)
    if stale:
        pytest.fail(f"{', '.join(str(p.relative_to(ROOT)) for p in stale)} out of date: run "
                    f"`python -m elucidate.cli.docs`")


def test_every_block_is_used_and_an_unknown_one_is_an_error():
    text = "".join(p.read_text() for p in PAGES)
    assert {name for name in BLOCKS if f"<!-- generated: {name} -->" not in text} == set()
    with pytest.raises(ValueError, match="unknown generated block 'nope'"):
        render("<!-- generated: nope -->\n<!-- end generated -->")
    stale = "a\n<!-- generated: schedules -->\nold\n<!-- end generated -->\nb"
    assert "| `karras` |" in render(stale) and render(render(stale)) == render(stale)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_images_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert missing == []


def test_the_index_lists_every_page():
    index = (ROOT / "docs" / "index.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert {name for name in pages if f"]({name})" not in index} == set()


def test_the_readme_is_a_short_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10_000
    assert "make demo" in readme and "make test" in readme and "docs/index.md" in readme
