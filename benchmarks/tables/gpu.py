"""Helpers of the GPU blocks (files of benchmarks/gpu_run.sh, under benchmarks/results/gpu-h200/)."""

from tables.common import GPU, load, sci


def gpu_rows(rel: str) -> dict:
    """{(mode, n): {kernel: row}}."""
    out: dict = {}
    for r in load(rel)["rows"]:
        out.setdefault((r["mode"], r["n"]), {})[r["kernel"]] = r
    return out


def gpu_check_summary() -> str:
    rel = f"{GPU}/gpu_check.json"
    c = load(rel)
    res = c["results"]
    ok = sum(1 for r in res.values() if r["ok"])
    f32 = [r["err"] for k, r in res.items() if "tol" in r and r["tol"] == 1e-3]
    bf16 = [r["err"] for k, r in res.items() if k.startswith("bf16")]
    graph = res["cuda-graph-replay"]["err"]
    replay = "is bit-identical to eager launches" if graph == 0 else f"differs from eager launches by {sci(graph)}"
    return (f"Correctness on the {c['device']} (`{rel}`): {ok} of {len(res)} checks pass; float32 cases within "
            f"{sci(max(f32))} of the float64 reference, bfloat16 within {max(bf16):.3f}; a replayed CUDA graph "
            f"{replay}.")
