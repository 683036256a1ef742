"""The Triton Λ-attention kernel against full attention on one CUDA GPU.

NOT RUN YET: written on a machine without a GPU (only `--help` was checked there).
Needs CUDA, triton, and optionally flash-attn (else torch SDPA is the baseline).

For each sequence length n:
- decode: `--batch` requests at length n, one query each. Λ reads the G + W keys
  it needs per request; full attention reads all n. Printed: microseconds per
  step and achieved memory bandwidth, as a fraction of the card's peak (a table
  by device name, or --peak-gbps) and of a measured device-to-device copy.
- prefill: one request of n tokens in one launch (causal full attention vs Λ).
  Printed: milliseconds and achieved TFLOP/s (prefill is compute bound).
Timing: warm-up runs excluded, CUDA events, synchronised, median of --iters.
A self-check first: with W = C >= n and G = 0, Λ is full causal attention, so
the kernel must match SDPA there (max error printed, fails the run if > --tol).

    python benchmarks/gpu_kernel.py --help
    python benchmarks/gpu_kernel.py --lengths 4096 16384 65536 131072 --batch 8
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Spec-sheet HBM bandwidth, GB/s, by a substring of torch's device name.
PEAK_GBPS = {
    "H200": 4800,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,  # SXM
    "A100-SXM4-80GB": 2039,
    "A100": 1555,
    "L40S": 864,
    "L4": 300,
    "A10": 600,
    "RTX 4090": 1008,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    p.add_argument("--batch", type=int, default=8, help="decode requests per step")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--rotary-dim", type=int, default=None, help="default: the head size")
    p.add_argument("--interleaved", action="store_true", help="GPT-J pair layout instead of neox")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--local-tokens", type=int, default=4096)
    p.add_argument("--distance-cap", type=int, default=8192)
    p.add_argument("--modes", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-gbps", type=float, default=None, help="default: from the device name")
    p.add_argument("--tol", type=float, default=2e-2, help="self-check tolerance (bf16 default)")
    p.add_argument("--out", type=Path, default=Path("out/gpu_kernel.json"))
    return p.parse_args(argv)


def timed_ms(fn, warmup, iters):
    """Median milliseconds of fn() over iters runs, after warmup runs."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_gbps():
    """Measured device-to-device copy bandwidth (read + write), GB/s."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = timed_ms(lambda: y.copy_(x), 2, 10)
    return 2 * x.numel() / ms / 1e6


class Setup:
    """A paged cache holding `lengths` tokens per request, in permuted blocks."""

    def __init__(self, args, lengths, cfg):
        import torch

        from lminf_vllm.rope import default_inv_freq

        self.args, self.cfg = args, cfg
        self.dtype = getattr(torch, args.dtype)
        H, Hkv, D, B = args.heads, args.kv_heads, args.head_size, args.block_size
        rot = args.rotary_dim or D
        self.rotary_dim, self.neox = rot, not args.interleaved
        self.inv_freq = default_inv_freq(10000.0, rot).cuda()
        per_req = [-(-n // B) for n in lengths]
        self.kv_cache = torch.randn(sum(per_req), Hkv, B, 2 * D, dtype=self.dtype, device="cuda")
        order = torch.randperm(sum(per_req), device="cuda", dtype=torch.int32)
        self.block_table = torch.zeros(len(lengths), max(per_req), dtype=torch.int32, device="cuda")
        used = 0
        for r, nb in enumerate(per_req):
            self.block_table[r, :nb] = order[used : used + nb]
            used += nb
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")

    def run(self, q_lens):
        """A callable that attends q_lens[r] queries at the end of request r."""
        import torch

        from lminf_vllm.triton_lambda_attention import triton_lambda_attention

        starts = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
        T = int(sum(q_lens))
        a = self.args
        q = torch.randn(T, a.heads, a.head_size, dtype=self.dtype, device="cuda")
        out = torch.empty_like(q)

        def step():
            triton_lambda_attention(
                q, self.kv_cache, out, starts, self.seq_lens, self.block_table, self.cfg,
                a.head_size**-0.5, self.inv_freq, self.rotary_dim, self.neox,
                decode_only=all(n == 1 for n in q_lens),
            )  # fmt: skip
            return out

        return step, q


def full_attention(q, k, v):
    """Causal full attention as a callable (layout work done once, outside the timing).
    q [B, Tq, H, D], k/v [B, Tk, Hkv, D]; the queries are the last Tq positions."""
    import torch

    try:
        from flash_attn import flash_attn_func

        return lambda: flash_attn_func(q, k, v, causal=True)  # causal mask aligned bottom-right
    except ImportError:
        group = q.shape[2] // k.shape[2]
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
        causal = q.shape[1] > 1  # a decode query sees every key; a full prefill is top-left aligned
        return lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


def self_check(args):
    """W = C >= n, G = 0: Λ must equal causal full attention on the same keys."""
    import torch

    from lminf_vllm.config import LminfConfig

    n = 1000
    cfg = LminfConfig(global_tokens=0, local_tokens=n, distance_cap=n)
    s = Setup(args, [n], cfg)
    step, q = s.run([n])
    pos = torch.arange(n, device="cuda")
    blocks, rows = s.block_table[0, pos // args.block_size].long(), pos % args.block_size
    kv = s.kv_cache[blocks, :, rows]  # [n, Hkv, 2D]
    D = args.head_size
    ref = full_attention(q[None], kv[None, ..., :D], kv[None, ..., D:])()[0]
    err = (step().float() - ref.float()).abs().max().item()
    print(f"self-check (G=0, W=C=n={n}, vs full attention): max error {err:.3g}")
    if err > args.tol:
        raise SystemExit(f"self-check failed: {err:.3g} > --tol {args.tol}")


def main(argv=None):
    args = parse_args(argv)
    import torch

    from lminf_vllm.config import LminfConfig
    from lminf_vllm.triton_lambda_attention import triton_available

    if not torch.cuda.is_available() or not triton_available():
        raise SystemExit("needs a CUDA GPU and triton")
    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
    copy = copy_gbps()
    print(f"{name}: spec peak {peak or '?'} GB/s, measured copy {copy:.0f} GB/s")
    self_check(args)
    cfg = LminfConfig(args.global_tokens, args.local_tokens, args.distance_cap)
    G, W, H, Hkv, D = cfg.global_tokens, cfg.local_tokens, args.heads, args.kv_heads, args.head_size
    el = torch.finfo(getattr(torch, args.dtype)).bits // 8
    rows = []
    for n in args.lengths:
        if "decode" in args.modes:
            s = Setup(args, [n] * args.batch, cfg)
            step, q = s.run([1] * args.batch)
            t_lam = timed_ms(step, args.warmup, args.iters)
            keys = min(n, W) + max(0, min(G, n - W))
            lam_bytes = args.batch * (Hkv * keys * 2 * D + 2 * H * D) * el
            kk = torch.randn(args.batch, n, Hkv, D, dtype=q.dtype, device="cuda")
            vv = torch.randn_like(kk)
            t_full = timed_ms(full_attention(q[:, None], kk, vv), args.warmup, args.iters)
            full_bytes = args.batch * (Hkv * n * 2 * D + 2 * H * D) * el
            for kind, ms, nbytes in (("lambda", t_lam, lam_bytes), ("full", t_full, full_bytes)):
                gbps = nbytes / ms / 1e6
                rows.append(dict(mode="decode", n=n, kernel=kind, us=ms * 1e3, gbps=gbps,
                                 of_peak=gbps / peak if peak else None, of_copy=gbps / copy))  # fmt: skip
            del s, kk, vv
        if "prefill" in args.modes:
            s = Setup(args, [n], cfg)
            step, q = s.run([n])
            t_lam = timed_ms(step, 1, max(3, args.iters // 4))
            seen = sum(min(i + 1, W) + max(0, min(G, i - W + 1)) for i in range(n))  # keys per query
            lam_flops = 4 * H * D * seen
            kk = torch.randn(1, n, Hkv, D, dtype=q.dtype, device="cuda")
            vv = torch.randn_like(kk)
            t_full = timed_ms(full_attention(q[None], kk, vv), 1, max(3, args.iters // 4))
            full_flops = 4 * H * D * n * (n + 1) // 2
            for kind, ms, flops in (("lambda", t_lam, lam_flops), ("full", t_full, full_flops)):
                rows.append(dict(mode="prefill", n=n, kernel=kind, ms=ms, tflops=flops / ms / 1e9))
            del s, kk, vv
        torch.cuda.empty_cache()
    for r in rows:
        if r["mode"] == "decode":
            frac = f"{r['of_peak']:.0%} of peak" if r["of_peak"] else "peak ?"
            print(f"decode  n={r['n']:>7} {r['kernel']:>6}: {r['us']:9.1f} us  {r['gbps']:7.0f} GB/s  "
                  f"{frac}, {r['of_copy']:.0%} of copy")  # fmt: skip
        else:
            print(f"prefill n={r['n']:>7} {r['kernel']:>6}: {r['ms']:9.2f} ms  {r['tflops']:7.1f} TFLOP/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, peak_gbps=peak, copy_gbps=copy, args={k: str(v) for k, v in vars(args).items()})
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
