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
        """The line under a table: which file, which command, and (CPU results) which CPU."""
        line = f"Source: [`{rel}`]({self.link(rel)}){note}; made by `{command}`."
        return line if rel.startswith(GPU) else f"{line} {cpu_line(rel)}"

    def image(self, rel: str, alt: str) -> str:
        return f"![{alt}]({self.link(rel)})"


def cpu_of(rel: str) -> dict | None:
    """The CPU a results file says it ran on (lminf_vllm/cpu_isa.describe), or None for older files."""
    data = load(rel)
    return data.get("cpu") if isinstance(data, dict) else None


def cpu_line(rel: str) -> str:
    cpu = cpu_of(rel)
    if cpu is None:
        return "CPU: not recorded (this file predates results that name their CPU)."
    isa = next((f for f in ("amx", "avx512_bf16", "avx512f", "avx2") if cpu.get(f)), "no AVX2")
    capped = "".join(f", capped by {k}={v}" for k, v in cpu.get("isa_capped_by", {}).items())
    return f"CPU: {cpu['model']}, {cpu['cores']} cores, {isa}{capped}; torch {cpu['torch']}, vLLM {cpu['vllm']}."


def same_cpu(*rels: str) -> None:
    """A ratio or table over several results files only when they name the same CPU (or none does)."""
    recorded = {rel: cpu_of(rel) for rel in rels}
    named = {json.dumps(c, sort_keys=True) for c in recorded.values() if c is not None}
    if len(named) > 1 or (named and None in recorded.values()):
        raise SystemExit(f"results from different CPUs in one table: {', '.join(rels)}; rerun them on one machine")


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
