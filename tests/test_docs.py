"""The README stays a front door: short, every page it points at exists, every docs page is reachable
from it, and every test it names as proof of a guarantee exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (lower case, punctuation dropped, spaces to hyphens)."""
    heads = [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_is_at_most_250_lines() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_and_anchor_resolves() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in re.finditer(r"\]\(([^)\s]+)\)", page.read_text()):
            target = match.group(1)
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.name}: link to missing {target}"
            if anchor and resolved.suffix == ".md":
                assert anchor in _anchors(resolved), f"{page.name}: no heading for #{anchor} in {resolved.name}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {m.group(1) for m in LINK.finditer((ROOT / "README.md").read_text())}
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in linked, f"docs/{page.name} is not linked from the README"


def _named_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for every ``test_x.py::name`` (or ``tests/test_x.py::name``) in ``text``, and the ``::name``
    continuations after one, which name tests in that same file."""
    named = re.findall(r"`(?:tests/)?(test_\w+\.py)::(\w+)`", text)
    for block in re.findall(r"`(?:tests/)?(test_\w+\.py)::\w+`((?:,?\s*(?:\([^)]*\)\s*,?\s*)?`::\w+`)+)", text):
        named += [(block[0], name) for name in re.findall(r"`::(\w+)`", block[1])]
    return named


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_every_test_the_docs_name_exists(page: str) -> None:
    named = _named_tests((ROOT / page).read_text())
    if page == "README.md":
        assert len(named) >= 20, f"only {len(named)} test names in the README: has its way of naming them changed?"
    for file, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(), re.M), \
            f"{page} names {file}::{name}, which does not exist"


def test_every_flag_table_is_its_config() -> None:
    """The service's table (README) and the build's (docs/model.md) are rendered from the config fields."""
    from engine_build.config import OPTIONS as BUILD
    from stream.config import OPTIONS as STREAM
    for page, options, module in (("README.md", STREAM, "stream.config"),
                                  ("docs/model.md", BUILD, "engine_build.config")):
        assert options.markdown_table() in (ROOT / page).read_text(), \
            f"regenerate {page}'s table: python -c 'import {module} as c; print(c.OPTIONS.markdown_table())'"
