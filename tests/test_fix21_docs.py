"""Fix pass 21: README.md's histories moved to HISTORY.md; every in-page and cross-file link of the two resolves.

Anchors follow GitHub's slugs: the heading's text lowercased, punctuation other than '-' and '_' dropped, spaces made
'-', a repeated heading given -1, -2, ...; a `#` line inside a fenced code block is no heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "HISTORY.md")
# `](#x)`, `](README.md#x)`, `](HISTORY.md)`: a relative link, not a URL
LINK = re.compile(r"\]\(([^)\s:#]*)(?:#([^)\s]*))?\)")


def _unfenced(text: str):
    """(line number, line) of the text outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield n, line


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _unfenced(text):
        m = re.match(r"(#{1,6}) (.*)", line)
        if m:
            base = slug(m.group(2))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def broken_links(docs: dict[str, str]) -> list[str]:
    """'file:line: target' for each relative link of `docs` (name -> text) whose file or anchor is missing (an
    anchor is checked in `docs` only)."""
    known = {name: anchors(text) for name, text in docs.items()}
    broken = []
    for name, text in docs.items():
        for n, line in _unfenced(text):
            for target, anchor in LINK.findall(line):
                file = target or name
                if file in known:
                    ok = not anchor or anchor in known[file]
                else:  # another file of the repo (its anchors not checked)
                    ok = (ROOT / file).exists()
                if not ok:
                    broken.append(f"{name}:{n}: ]({target}#{anchor})")
    return broken


@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    return {name: (ROOT / name).read_text(encoding="utf-8") for name in DOCS}


def test_every_link_of_readme_and_history_resolves(docs):
    assert broken_links(docs) == []
    assert sum(len(LINK.findall(t)) for t in docs.values()) > 40  # (the Contents lines alone hold more)


def test_readme_points_to_history(docs):
    """README.md says what the code does now; the change log, measurement history and fix histories are one link away."""
    readme, history = docs["README.md"], docs["HISTORY.md"]
    assert "](HISTORY.md#change-log-newest-first)" in readme and "](HISTORY.md#measurement-history)" in readme
    assert "## Change log (newest first)" in history and "### Runtime fix history" in history
    assert "## Change log" not in readme and "### Runtime fix history" not in readme


def test_the_check_catches_a_broken_anchor_and_a_missing_file(docs):
    assert anchors("# A b\n## API\n```\n# not a heading\n```\n## API\n### `x.py`'s (new) v2.0") == {
        "a-b",
        "api",
        "api-1",
        "xpys-new-v20",
    }
    broken = dict(
        docs, **{"README.md": docs["README.md"] + "\n[x](HISTORY.md#no-such-part) [y](#api-2) [z](NOTES.md)\n"}
    )
    n = len(broken["README.md"].splitlines())
    assert broken_links(broken) == [
        f"README.md:{n}: ](HISTORY.md#no-such-part)",
        f"README.md:{n}: ](#api-2)",
        f"README.md:{n}: ](NOTES.md#)",
    ]
