"""What every renderer shares: paths, the markdown a block is written into, number formats."""

import ast
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results"
GPU = f"{RESULTS}/gpu-h200"


def load(rel: str):
    return json.loads((ROOT / rel).read_text())


class Doc:
    """The markdown file a block is rendered into: links are relative to it."""

    def __init__(self, path: Path):
        self.dir = path.parent

    def link(self, rel: str) -> str:
        return Path(os.path.relpath(ROOT / rel, self.dir)).as_posix()

    def source(self, rel: str, command: str, note: str = "") -> str:
        """The line under a table: which file, which command."""
        return f"Source: [`{rel}`]({self.link(rel)}){note}; made by `{command}`."

    def image(self, rel: str, alt: str) -> str:
        return f"![{alt}]({self.link(rel)})"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def sci(x: float) -> str:
    return f"{x:.1e}"


def span(values: list[float], fmt=ratio) -> str:
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def home(value: str) -> str:
    """A path under a home directory, as ~/... (the recorded path names the machine's user)."""
    return re.sub(r"^/(root|home/[^/]+)/", "~/", value)


def lminf_settings(args: dict) -> str:
    return f"G={args['global_tokens']}, W={args['local_tokens']}, C={args['distance_cap']}"


def first_backend(args: dict) -> str:
    """The baseline of a speed table: the first of the recorded --backends (stored as str() of a list)."""
    return ast.literal_eval(args["backends"])[0]


def cell_text(answer: str) -> str:
    """A generated answer inside a table cell: one line, no column breaks."""
    return answer.replace("\n", " ").replace("|", "\\|").strip()
