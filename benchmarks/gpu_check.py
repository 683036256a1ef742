"""Correctness of the Triton Λ-attention kernel on a real GPU.

`make test` checks the kernel under Triton's CPU interpreter; this runs the same
cases compiled on a CUDA GPU (split-K then chosen automatically, as in serving),
plus:
- bfloat16 cases at model-like shapes (heads 32/8 of 128, 9/3 of 64), checked
  against the float64 dense reference at bfloat16's precision;
- CUDA graphs: a decode batch is captured once, the inputs are changed in place
  (new queries, longer sequences, padding slots as vLLM's padded batches have)
  and the graph replayed; it must equal an eager launch on the same inputs.

Prints one line per case and exits non-zero if any fails. Needs torch, triton,
pytest (for the case list) and a CUDA GPU; not vLLM.

    python benchmarks/gpu_check.py [--out out/gpu_check.json]
"""

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

BF16_CASES = {  # realistic head shapes; tolerance: bfloat16 rounds q, k, v and p
    "bf16-H32-Hkv8-D128-mixed": dict(
        cfg=(10, 256, 512), block_size=16, heads=[32, 8, 128], dtype="bfloat16",
        lengths=[1500, 1, 700, 257, 2049], queries=[1, 1, 300, 1, 1],
    ),
    "bf16-H9-Hkv3-D64-steps": dict(
        cfg=(10, 128, 192), block_size=16, heads=[9, 3, 64], dtype="bfloat16", lengths=[700],
        steps=[256, 256, 100, 1, 1, 1, 85],
    ),
    "bf16-far-1M-H32-D128": dict(
        far=1_000_003, queries=2, cfg=(4, 300, 400), block_size=16, heads=[32, 8, 128], dtype="bfloat16",
    ),
}  # fmt: skip


def graph_check():
    """Capture a decode step, change inputs in place, replay; compare with eager."""
    import torch

    from lminf_vllm.config import LminfConfig
    from lminf_vllm.rope import default_inv_freq
    from lminf_vllm.paths.triton.kernels import triton_lambda_attention

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    R, H, Hkv, D, B, width = 8, 32, 8, 128, 16, 128  # up to 2048 tokens per request
    cfg = LminfConfig(global_tokens=4, local_tokens=1000, distance_cap=1500)  # split-K: 4 segments on an H100
    cache = torch.randn(R * width + 1, Hkv, B, 2 * D, dtype=dt, device=dev)
    table = torch.randperm(R * width, device=dev, dtype=torch.int32).view(R, width) + 1
    seq_lens = torch.tensor([100, 1500, 3, 2048, 250, 1, 800, 1004], dtype=torch.int32, device=dev)
    qsl = torch.arange(R + 1, dtype=torch.int32, device=dev)
    q = torch.randn(R, H, D, dtype=dt, device=dev)
    out = torch.zeros_like(q)
    inv_freq = default_inv_freq(10000.0, D).to(dev)

    def step(o):
        return triton_lambda_attention(q, cache, o, qsl, seq_lens, table, cfg, D**-0.5, inv_freq, D, True,
                                       decode_only=True)  # fmt: skip

    step(out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(out)
    errors = []
    for trial in range(3):
        q.copy_(torch.randn_like(q))
        seq_lens.copy_(torch.randint(1, width * B + 1, (R,), device=dev, dtype=torch.int32))
        if trial == 2:  # a padded batch: 5 real requests, 3 empty slots
            qsl[6:] = 5
            seq_lens[5:] = 0
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = step(torch.full_like(q, float("nan")))
        real = int(qsl[-1])
        errors.append(float((out[:real].float() - eager[:real].float()).abs().max()))
    return max(errors)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/gpu_check.json"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: interpreter smoke test")
    p.add_argument("--only", default="", help="run only the cases whose id contains this")
    args = p.parse_args(argv)
    os.environ["LMINF_TRITON_DEVICE"] = args.device  # read by tests/triton_cases.py at import
    if args.device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)
    import torch

    import triton_cases
    from test_triton_lambda_attention import CASES

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    print(f"{device}, torch {torch.__version__}", flush=True)
    results, failed = {}, 0
    cases = [(k, c) for k, c in list(CASES.items()) + list(BF16_CASES.items()) if args.only in k]
    for case_id, case in cases:
        dtype = case.get("dtype", "float32")
        tol = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 6e-2}[dtype]
        try:
            err = triton_cases.run_far_case(case) if "far" in case else triton_cases.run_case(case)
            ok = err < tol
            results[case_id] = dict(err=err, tol=tol, ok=ok)
            print(f"{'ok  ' if ok else 'FAIL'} {case_id}: max err {err:.3g} (tol {tol:g})", flush=True)
        except Exception:
            ok = False
            results[case_id] = dict(error=traceback.format_exc(), ok=False)
            print(f"FAIL {case_id}:\n{traceback.format_exc()}", flush=True)
        failed += not ok
    try:
        if args.device != "cuda":
            raise RuntimeError("skipped: CUDA graphs need a GPU")
        err = graph_check()
        results["cuda-graph-replay"] = dict(err=err, ok=err == 0.0)
        print(f"{'ok  ' if err == 0.0 else 'FAIL'} cuda-graph-replay vs eager: max diff {err:.3g}", flush=True)
        failed += err != 0.0
    except Exception:
        results["cuda-graph-replay"] = dict(error=traceback.format_exc(), ok=False)
        print(f"FAIL cuda-graph-replay:\n{traceback.format_exc()}", flush=True)
        failed += 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(device=device, results=results), indent=1))
    print(f"{len(results) - failed}/{len(results)} passed; wrote {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
