"""The documentation's numbers are rendered from benchmarks/results/, and its links resolve.

No engine: the generated blocks of README.md and docs/*.md must equal what
benchmarks/report.py renders from the results files today (run
`python benchmarks/report.py` after a benchmark rewrites its JSON), and every
relative link or image path must point at a file (and heading) that exists.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
HTML_SRC = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def test_generated_blocks_match_the_results_files():
    run = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_check_catches_a_hand_edited_number(monkeypatch):
    """--check must fail when a rendered figure is changed by hand."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # report's tables import their neighbours when rendering
    import report
    readme = (ROOT / "README.md").read_text()
    block = report.BLOCK.search(readme)
    assert block, "README.md has no generated block"
    bumped = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), block.group(3), count=1)
    edited = readme.replace(block.group(3), bumped, 1)
    assert edited != readme
    assert report.render(ROOT / "README.md", edited, set()) == readme


def test_every_results_table_names_its_source_and_command():
    text = "\n".join(p.read_text() for p in DOCS)
    blocks = re.findall(r"<!-- generated:([\w.-]+) -->\n(.*?)<!-- /generated:\1 -->", text, re.S)
    assert blocks
    for name, body in blocks:
        if "|---|" in body:
            assert "Source: [`benchmarks/results/" in body and "made by `" in body, name


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file, plus explicit <a id=...>."""
    text = CODE.sub("", md.read_text())
    found = set(re.findall(r"<a id=\"([^\"]+)\"", text))
    seen: dict[str, int] = {}
    for title in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(md: Path) -> list[str]:
    text = CODE.sub("", md.read_text())
    return LINK.findall(text) + HTML_SRC.findall(text)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_exist(md):
    missing = []
    for target in links(md):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            missing.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            missing.append(target)
    assert not missing, f"{md.relative_to(ROOT)}: broken links {missing}"


def test_link_check_sees_links():
    """Guard against a regex that silently matches nothing."""
    readme = links(ROOT / "README.md")
    assert any(t.endswith(".png") for t in readme) and any(t.startswith("docs/") for t in readme)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_have_as_many_cells_as_their_header(md):
    """A stray `|` inside a cell (e.g. in a rendered header) silently shifts a column."""
    lines = md.read_text().splitlines()
    bad = []
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            width = cells(lines[i])
            for j in range(i + 2, len(lines)):
                if not lines[j].startswith("|"):
                    break
                if cells(lines[j]) != width:
                    bad.append(j + 1)
    assert not bad, f"{md.relative_to(ROOT)}: rows with the wrong number of cells at lines {bad}"


def cells(row: str) -> int:
    return re.sub(r"`[^`]*`", "", row.replace("\\|", "")).count("|")
