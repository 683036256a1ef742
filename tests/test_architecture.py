"""The package's shape, checked from its imports: one room per path, vLLM at the edge, oracles apart."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lminf_vllm"


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_nothing_outside_the_testing_package_imports_the_oracles():
    users = {m for m, deps in MODULES.items() if any(d.startswith("lminf_vllm.testing") for d in deps)}
    assert {m for m in users if not m.startswith("lminf_vllm.testing")} == set()


def test_paths_and_the_math_below_them_see_no_vllm():
    """vLLM's types stop at backend.py; only a path's `ops` module calls vLLM's C++ ops (the
    CPU-kernel path's and the top-k path's), through cpu_attention_kernel where both call the
    same kernel."""
    vllm_free = [m for m in MODULES if m.startswith("lminf_vllm.paths") or m in (
        "lminf_vllm.step", "lminf_vllm.routing", "lminf_vllm.kv_layout", "lminf_vllm.lambda_attention",
        "lminf_vllm.rope", "lminf_vllm.config", "lminf_vllm.block_policy", "lminf_vllm.model_support",
        "lminf_vllm.metrics", "lminf_vllm.paths.topk.attention", "lminf_vllm.paths.topk.store",
    )]  # fmt: skip
    assert len(vllm_free) >= 12
    for m in vllm_free:
        if m in ("lminf_vllm.paths.cpu_kernel.ops", "lminf_vllm.paths.topk.ops"):
            continue
        assert not any(d == "vllm" or d.startswith("vllm.") for d in MODULES[m]), m


def test_no_import_climbs_back_up_or_across_paths():
    """A path module imports the shared modules below it and its own parts, never
    the backend, the patches, the paths package's chooser or another path."""
    upward = ("lminf_vllm.backend", "lminf_vllm.runtime_patches", "lminf_vllm.vllm_config")
    below = ("lminf_vllm.step", "lminf_vllm.routing", "lminf_vllm.kv_layout", "lminf_vllm.lambda_attention",
             "lminf_vllm.rope", "lminf_vllm.config", "lminf_vllm.cpu_attention_kernel")  # fmt: skip
    for m, deps in MODULES.items():
        if not m.startswith("lminf_vllm.paths.") and m not in below:
            continue
        own = ".".join(m.split(".")[:3])  # lminf_vllm.paths.<path>
        for d in deps:
            assert not d.startswith(upward), (m, d)
            if m in below:  # the shared math knows no path
                assert not d.startswith("lminf_vllm.paths"), (m, d)
            elif d.startswith("lminf_vllm.paths"):
                assert d.startswith(own), (m, d)


def test_the_backend_is_a_thin_shell():
    assert len((PACKAGE / "backend.py").read_text().splitlines()) <= 120
