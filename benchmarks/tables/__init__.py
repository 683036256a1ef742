"""The renderers of the docs' generated blocks: `<!-- generated:NAME -->` is made by
benchmarks/tables/blocks/NAME.json (a spec) or NAME.py (code); the folder is the registry.

A spec is rendered by the module its "kind" names (tables/generic.py unless it names one:
tables/quality.py, generation.py and throughput.py render their benchmark's file format).
A NAME.py has `render(doc) -> str`, for the blocks whose text needs arithmetic a spec can't say.
"""

import functools
import importlib
import importlib.util
import json
from pathlib import Path

from tables.common import Doc
from tables.generic import Missing

BLOCKS = Path(__file__).resolve().parent / "blocks"


def names() -> list[str]:
    return sorted(p.stem for p in BLOCKS.iterdir() if p.suffix in (".json", ".py"))


@functools.cache
def _code(path: Path):
    """A block's module, loaded from its file (a block's name has dashes, a module's can't)."""
    spec = importlib.util.spec_from_file_location(f"tables.blocks.{path.stem.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(name: str, doc: Doc) -> str:
    spec, code = BLOCKS / f"{name}.json", BLOCKS / f"{name}.py"
    if spec.exists() == code.exists():
        where = "both" if spec.exists() else "neither"
        raise LookupError(f"block {name!r}: {where} of benchmarks/tables/blocks/{name}.json and {name}.py exist")
    if code.exists():
        return _code(code).render(doc)
    s = json.loads(spec.read_text())
    try:
        return importlib.import_module(f"tables.{s.get('kind', 'generic')}").render(doc, s)
    except Missing as e:
        raise SystemExit(f"benchmarks/tables/blocks/{name}.json: {e}") from None
