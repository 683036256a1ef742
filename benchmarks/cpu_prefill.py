r"""One prefill chunk past the window on CPU: the PyTorch path, the kernel path, stock.

Times one layer's attention for a chunk of --chunk queries ending at each
length, on a random cache in the kernel's layout with permuted blocks:
  * torch:  lambda_attention.paged_lambda_attention (PyTorch's CPU flash
            attention over the window, the global branch merged by log-sum-exp);
  * kernel: paths/cpu_kernel/prefill.py's prefill_attention (vLLM's CPU kernel on a
            scratch cache, one channel more for the capped globals);
  * stock:  vLLM's CPU kernel as the stock backend runs it (full causal).
Prints microseconds per query (and how far the two lminf paths' outputs
differ) and writes JSON. The engine-level numbers are
benchmarks/throughput.py's; this isolates the attention call.

    python benchmarks/cpu_prefill.py --lengths 8192 32768 65536
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lminf_vllm.config import LminfConfig  # noqa: E402
from lminf_vllm.kv_layout import CPU_KERNEL_LAYOUT  # noqa: E402
from lminf_vllm.lambda_attention import paged_lambda_attention  # noqa: E402
from lminf_vllm.cpu_attention_kernel import attend, kernel_cache_views, scheduler_metadata  # noqa: E402
from lminf_vllm.paths.cpu_kernel.ops import kernel_mode  # noqa: E402
from lminf_vllm.paths.cpu_kernel.prefill import prefill_attention  # noqa: E402
from lminf_vllm.rope import RotarySpec, default_inv_freq  # noqa: E402
from shape_args import add_head_args, add_lminf_args  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--chunk", type=int, default=4096, help="queries in the chunk (the last ones of the prompt)")
    add_head_args(p)
    add_lminf_args(p)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per point; the fastest counts")
    p.add_argument("--no-stock", action="store_true", help="skip the full-causal stock call (slow at 64k+)")
    p.add_argument("--out", type=Path, default=Path("out/cpu_prefill.json"))
    return p.parse_args(argv)


def fastest(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def stock_call(q, kv_cache, table, n, scale, isa):
    """vLLM's kernel over the whole prefix, causal, as CPU_ATTN runs a prefill chunk."""
    T, H, D = q.shape
    qsl, seq = torch.tensor([0, T], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    meta = scheduler_metadata(qsl, seq, -1, isa, H, kv_cache.shape[1], D, q.dtype)
    kc, vc = kernel_cache_views(kv_cache)
    out = torch.empty_like(q)
    return lambda: attend(q, kc, vc, out, qsl, seq, table[None], -1, meta, scale)


def main(argv=None):
    args = parse_args(argv)
    H, Hkv, D, B = args.heads, args.kv_heads, args.head_size, args.block_size
    cfg = LminfConfig(args.global_tokens, args.local_tokens, args.distance_cap)
    isa = kernel_mode("cpu", True, torch.float32, B, Hkv, D)
    if isa is None:
        sys.exit("vLLM's CPU attention kernel does not serve this shape here")
    rotary = RotarySpec(default_inv_freq(10000.0, D), D, True)
    scale = D**-0.5
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"threads {torch.get_num_threads()}; H={H} Hkv={Hkv} D={D} B={B}; {cfg.describe()}; chunk {args.chunk}")
    print("| prompt | torch us/query | kernel us/query | stock us/query | kernel x torch | kernel x stock | max diff |")
    print("|---|---|---|---|---|---|---|")
    for n in args.lengths:
        T = min(args.chunk, n)
        blocks = -(-n // B)
        kv_cache = torch.randn(blocks + 1, Hkv, B, 2 * D, generator=gen)
        table = (torch.randperm(blocks, generator=gen) + 1).to(torch.int32)
        q = torch.randn(T, H, D, generator=gen)
        call = (q, kv_cache, table, n, cfg, scale, rotary)
        diff = (paged_lambda_attention(*call, None, CPU_KERNEL_LAYOUT) - prefill_attention(*call, CPU_KERNEL_LAYOUT))
        t_torch = fastest(lambda: paged_lambda_attention(*call, None, CPU_KERNEL_LAYOUT), args.repeats)
        t_kernel = fastest(lambda: prefill_attention(*call, CPU_KERNEL_LAYOUT), args.repeats)
        t_stock = None if args.no_stock else fastest(stock_call(q, kv_cache, table, n, scale, isa), args.repeats)
        row = {"prompt": n, "chunk": T, "torch_us_per_query": t_torch / T * 1e6,
               "kernel_us_per_query": t_kernel / T * 1e6, "max_diff_kernel_vs_torch": diff.abs().max().item(),
               "stock_us_per_query": None if t_stock is None else t_stock / T * 1e6}  # fmt: skip
        rows.append(row)
        stock = "-" if t_stock is None else f"{row['stock_us_per_query']:.2f}"
        vs_stock = "-" if t_stock is None else f"{t_stock / t_kernel:.2f}"
        print(f"| {n} | {row['torch_us_per_query']:.2f} | {row['kernel_us_per_query']:.2f} | {stock} "
              f"| {t_torch / t_kernel:.2f} | {vs_stock} | {row['max_diff_kernel_vs_torch']:.1e} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    recorded = {"cpu": describe(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.write_text(json.dumps(recorded, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
