r"""A top-k step's decode attention where C = W, 30 layers: far_kernel's one pass against the op and the pass joined.

A top-k decode row reads its window (W slots of the pool, the query as the model rotated it) and
its keys past the window (whole global blocks, the rows of its first window block before the
window, the k picks: from the host store, at position 0, the query rotated to C). The engine
reads both in one C++ pass (`far_kernel.attend` with `window`: one online softmax); before, vLLM's
decode op (`ops.ListedCall`) read the windows and the pass the store's keys alone, joined by
`merge_two`. This times both ways on SmolLM2-135M's shape (3 KV heads of 64 channels, 9 query
heads, blocks of 128, bfloat16; G = 10, W = C = 2048, k = 4) for R rows: a pool of some 200 MB
whose window blocks are drawn at random per layer (as an engine's pool is shared), the store's
chunks of 16 blocks per row, 30 layers a step. The two ways are held to each other (float32
rounding) first. Prints ms a step (the fastest of --rounds rounds, the ways in alternation) and
writes JSON.

    python benchmarks/topk_decode_pass.py --out benchmarks/results/topk-decode-pass.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lminf_vllm.cpu_isa import describe  # noqa: E402
from lminf_vllm.kv_layout import token_numbers, token_views  # noqa: E402
from lminf_vllm.paths.topk import far_kernel, ops  # noqa: E402
from lminf_vllm.paths.topk.attention import merge_two  # noqa: E402

HKV, G, D, B, N, W, K, LAYERS, SCALE = 3, 3, 64, 128, 16, 2048, 4, 30, 0.125


def case(rows: int, pool_blocks: int, gen: torch.Generator):
    """A step's inputs: the pool, each row's store chunks and listed blocks, and per layer the windows."""
    cache = torch.randn(pool_blocks, HKV, B, 2 * D, generator=gen).bfloat16()
    keys = [[torch.randn(N, HKV, B, D, generator=gen).bfloat16() for _ in range(8)] for _ in range(rows)]
    values = [[torch.randn(N, HKV, B, D, generator=gen).bfloat16() for _ in range(8)] for _ in range(rows)]
    addresses = [([t.data_ptr() for t in k], [t.data_ptr() for t in v]) for k, v in zip(keys, values)]
    bases = far_kernel.base_table(addresses)
    blocks = torch.randint(0, 8 * N, (rows, HKV, 2 + K), generator=gen)  # a global block, block fa, the k picks
    i = 20 * B + 77  # the row's position: its window starts 78 slots into block fa = 4
    counts = torch.tensor([[B, (i - W + 1) % B] + [B] * K] * rows)
    pos = torch.arange(i - W + 1, i + 1)
    fa = (i - W + 1) // B
    starts = torch.arange(fa, i // B + 1) * B
    lo, hi = starts.clamp(min=i - W + 1), (starts + B).clamp(max=i + 1)
    layers = []
    for _ in range(LAYERS):
        phys = torch.randperm(pool_blocks, generator=gen)[: rows * len(starts)].view(rows, -1)
        segments = torch.stack([torch.stack((phys[r], lo - starts, hi - lo), 1) for r in range(rows)])
        tokens = torch.stack([token_numbers(phys[r][pos // B - fa], pos % B, HKV, B) for r in range(rows)])
        layers.append((segments, tokens.to(torch.int32)))
    q = torch.randn(rows, HKV * G, D, generator=gen).bfloat16()  # as the model rotated it
    q_cap = torch.randn(rows, HKV, G, D, generator=gen)  # rotated to C
    return cache, (keys, values), bases, blocks, counts, layers, q, q_cap


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32], help="decode rows a step")
    p.add_argument("--pool-mb", type=int, default=200, help="the pool's size (more than the caches)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="timed steps a round")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/topk-decode-pass.json"))
    args = p.parse_args(argv)
    if not (far_kernel.usable(torch.bfloat16) and ops.usable(torch.bfloat16, HKV * G, HKV, D, B)):
        sys.exit("far_kernel's pass or vLLM's decode op is unavailable here")
    pool_blocks = args.pool_mb * 2**20 // (HKV * B * 2 * D * 2)
    results = []
    with torch.inference_mode():
        for rows in args.rows:
            gen = torch.Generator().manual_seed(rows)
            cache, _store, bases, blocks, counts, layers, q, q_cap = case(rows, pool_blocks, gen)
            splits = far_kernel.splits_for(rows, torch.get_num_threads())
            call = ops.ListedCall(rows, W, HKV * G, HKV, D, torch.bfloat16)
            qw = q.float().view(rows, HKV, G, D)

            def one_pass(layer):
                segments, _ = layers[layer]
                return far_kernel.attend(bases, blocks, counts, q_cap, N, B, D, torch.bfloat16, SCALE,
                                         (cache, segments, qw), splits)[0]  # fmt: skip

            def op_and_pass(layer):
                _, tokens = layers[layer]
                o_f, lse_f = far_kernel.attend(bases, blocks, counts, q_cap, N, B, D, torch.bfloat16, SCALE)
                o_w, lse_w = call(q, *token_views(cache), tokens, SCALE)
                return merge_two(o_w, lse_w, o_f, lse_f)

            diff = max((one_pass(j) - op_and_pass(j)).abs().max().item() for j in range(LAYERS))
            if not diff < 1e-4:
                sys.exit(f"the two ways disagree by {diff} at {rows} rows")
            best = {}
            for _ in range(args.rounds):  # in alternation: the machine's drift falls on both
                for name, way in (("one_pass", one_pass), ("op_and_pass", op_and_pass)):
                    for j in range(LAYERS):
                        way(j)  # (warm)
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        for j in range(LAYERS):
                            way(j)
                    ms = (time.perf_counter() - t0) / args.steps * 1e3
                    best[name] = min(best.get(name, ms), ms)
            row = {"rows": rows, "splits": splits, "one_pass_ms_per_step": round(best["one_pass"], 2),
                   "op_and_pass_ms_per_step": round(best["op_and_pass"], 2),
                   "op_and_pass_x_one_pass": round(best["op_and_pass"] / best["one_pass"], 2),
                   "max_abs_diff": diff}  # fmt: skip
            results.append(row)
            print(row, flush=True)
    doc = {"cpu": describe(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "command": "python benchmarks/topk_decode_pass.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "shape": {"Hkv": HKV, "g": G, "D": D, "B": B, "chunk_blocks": N, "W": W, "k": K, "layers": LAYERS,
                     "dtype": "bfloat16", "pool_mb": args.pool_mb},
           "rows": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
