"""Launch-parameter sweep for the Triton Λ-attention kernel on one CUDA GPU.

For a decode batch and a prefill, times the kernel (CUDA graph replay, as
benchmarks/gpu_kernel.py) under each setting of num_warps, num_stages and the
key tile BLOCK_N, and prints registers and spills of each compiled variant.
The settings go through `lminf_vllm.paths.triton.kernels.TUNING` (they apply to
the window kernel, which carries nearly all the work).

    python benchmarks/gpu_tune.py --n 16384
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_kernel  # noqa: E402


def compiled_stats(fn):
    """(registers, spills) of the most recently compiled variant of a JIT function."""
    try:
        kernels = [k for cache in fn.device_caches.values() for k in cache[0].values()]
        kernels[-1]._init_handles()
        k = kernels[-1]
        return int(k.n_regs), int(k.n_spills)
    except Exception:  # the cache layout differs between triton versions
        return None, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--modes", nargs="+", default=["decode", "prefill"])
    p.add_argument("--out", type=Path, default=Path("out/gpu_tune.json"))
    args, rest = p.parse_known_args(argv)
    bench = gpu_kernel.parse_args(rest)
    import torch

    from lminf_vllm.paths.triton import kernels as tla
    from lminf_vllm.config import LminfConfig

    cfg = LminfConfig(bench.global_tokens, bench.local_tokens, bench.distance_cap)
    rows = []
    for mode in args.modes:
        lengths, q_lens = ([args.n] * bench.batch, [1] * bench.batch) if mode == "decode" else ([args.n], [args.n])
        s = gpu_kernel.Setup(bench, lengths, cfg)
        for warps, stages, block_n in itertools.product(args.warps, args.stages, args.block_n):
            tla.TUNING.clear()
            tla.TUNING.update(num_warps=warps, num_stages=stages, BLOCK_N=block_n)
            try:
                step, _ = s.run(q_lens)
                ms, _ = gpu_kernel.timed_ms(step, 2, 10 if mode == "decode" else 3, 10 if mode == "decode" else 1)
                regs, spills = compiled_stats(tla._window_kernel)
                row = dict(mode=mode, n=args.n, warps=warps, stages=stages, block_n=block_n, us=ms * 1e3,
                           regs=regs, spills=spills)  # fmt: skip
            except Exception as exc:
                row = dict(mode=mode, n=args.n, warps=warps, stages=stages, block_n=block_n, error=str(exc)[:200])
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args, rows)
        del s
        torch.cuda.empty_cache()
    tla.TUNING.clear()
    for mode, b in write(args, rows).items():
        print(f"BEST {mode}: {json.dumps(b)}", flush=True)


def write(args, rows):
    """Write every row so far and the fastest setting per mode; returns the latter.
    Called after each row, so a run cut short by a time limit still leaves them."""
    best = {}
    for mode in args.modes:
        timed = [r for r in rows if r["mode"] == mode and "us" in r]
        if timed:
            b = min(timed, key=lambda r: r["us"])
            best[mode] = dict(num_warps=b["warps"], num_stages=b["stages"], BLOCK_N=b["block_n"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(rows=rows, best=best), indent=1))
    return best


if __name__ == "__main__":
    main()
