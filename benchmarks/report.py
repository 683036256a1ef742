r"""Render the measured numbers in README.md and docs/*.md from benchmarks/results/.

Every block between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` is
written from the files in benchmarks/results/ by benchmarks/tables/blocks/NAME.json
(a declarative spec) or NAME.py (code), and names its source file and the command
that made it. Nothing between the markers is typed by hand: after a benchmark
rewrites its JSON, run this script; `tests/test_docs.py` runs `--check`.

    python benchmarks/report.py          # rewrite the blocks in place
    python benchmarks/report.py --check  # exit 1 if a block differs from its rendering

A new benchmark's table: put `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`
in a page, write benchmarks/tables/blocks/NAME.json (its keys: tables/generic.py's
docstring; copy cpu-prefill.json), run this script. Only a table whose text needs
arithmetic a spec can't say gets NAME.py with `render(doc) -> str` instead.

Why a spec per block beside the renderers, not a "report" key inside each results
file: a results file is a measurement, rewritten whole by each run, while how it
is shown changes on its own (a header, a format) and should not need a rerun or a
hand edit of measured data; one file feeds several blocks (kv_memory.json: three)
and one block can read several files; and the folder of blocks, one file each,
is the registry, so adding a table touches no shared file.

Standard library only (no vLLM, no matplotlib): it runs anywhere in a second.
"""

import argparse
import difflib
import re
import sys
from pathlib import Path

import tables  # benchmarks/tables/, beside this file (the script's folder is on sys.path)
from tables.common import ROOT, Doc

BLOCK = re.compile(r"(<!-- generated:([\w.-]+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.S)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render(path: Path, text: str, used: set) -> str:
    doc = Doc(path)

    def one(m: re.Match) -> str:
        name = m.group(2)
        if name not in tables.names():
            raise SystemExit(f"{path.relative_to(ROOT)}: no block named {name!r}; "
                             f"add benchmarks/tables/blocks/{name}.json (or .py)")
        used.add(name)
        return m.group(1) + tables.render(name, doc).strip() + "\n" + m.group(4)

    return BLOCK.sub(one, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if any block is out of date")
    args = p.parse_args(argv)
    used: set = set()
    stale = []
    for path in documents():
        old = path.read_text()
        opened = len(re.findall(r"<!-- generated:", old))
        if opened != len(BLOCK.findall(old)):
            print(f"{path.relative_to(ROOT)}: a generated block is not closed by its <!-- /generated:NAME -->")
            return 1
        new = render(path, old, used)
        if new == old:
            continue
        stale.append(path)
        if args.check:
            rel = str(path.relative_to(ROOT))
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel, rel + " (rendered)"))
        else:
            path.write_text(new)
            print(f"rewrote {path.relative_to(ROOT)}")
    unused = sorted(set(tables.names()) - used)
    if unused:
        print(f"blocks in benchmarks/tables/blocks/ used by no document: {', '.join(unused)}")
        return 1
    if args.check and stale:
        print(f"out of date: {', '.join(str(p.relative_to(ROOT)) for p in stale)}; run `python benchmarks/report.py`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
