"""The Triton Λ-attention kernel against full attention on one CUDA GPU.

Needs CUDA and triton; flash-attn if installed, else PyTorch's SDPA (whose CUDA
backend is FlashAttention-2) is the full-attention baseline. `--device cpu`
runs a tiny smoke test under Triton's interpreter instead (no timings worth
reading; it only proves the script runs).

For each sequence length n:
- decode: `--batch` requests at length n, one query each. Λ reads the G + W keys
  it needs per request; full attention reads all n. Three kernels: Λ, full
  attention (FlashAttention/SDPA on contiguous K/V), and our kernel itself
  configured as full attention (G = 0, W = C = n) over the same paged cache.
  Printed: microseconds per step and achieved memory bandwidth, as a fraction
  of the card's peak (a table by device name, or --peak-gbps) and of a
  measured device-to-device copy.
- prefill: one request of n tokens in one call (causal full attention vs Λ).
  Printed: milliseconds and achieved TFLOP/s (useful FLOPs: the pairs the mask
  keeps).
Timing: each kernel is captured `--reps` times into one CUDA graph (this also
proves the launch is graph-capturable) and the graph replayed; CUDA events,
median of --iters replays, divided by --reps, after --warmup replays. Where a
baseline cannot be captured it is timed eagerly (the JSON says so).
A self-check first: with W = C >= n and G = 0, Λ is full causal attention, so
the kernel must match SDPA there (max error printed, fails the run if > --tol).

    python benchmarks/gpu_kernel.py --help
    python benchmarks/gpu_kernel.py --lengths 4096 16384 65536 131072 --batch 8
"""

import argparse
import json
import os
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
    p.add_argument("--reps", type=int, default=10, help="decode calls per captured CUDA graph")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: interpreter smoke test")
    p.add_argument("--peak-gbps", type=float, default=None, help="default: from the device name")
    p.add_argument("--tol", type=float, default=2e-2, help="self-check tolerance (bf16 default)")
    p.add_argument("--out", type=Path, default=Path("out/gpu_kernel.json"))
    return p.parse_args(argv)


def timed_ms(fn, warmup, iters, reps=1):
    """Milliseconds per fn() call: the median of `iters` timings of `reps`
    calls, after `warmup` untimed ones. On CUDA the reps are captured into one
    CUDA graph first (so Python launch overhead is not timed); returns
    (ms, "graph") or, where capture fails, eager timing and (ms, "eager")."""
    import time

    import torch

    if not torch.cuda.is_available():
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3, "cpu"
    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    how = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run = graph.replay
    except Exception as exc:  # a baseline that cannot be captured: time it eagerly
        print(f"  (not capturable, timed eagerly: {type(exc).__name__}: {str(exc)[:120]})")
        torch.cuda.synchronize()
        how = "eager"

        def run():
            for _ in range(reps):
                fn()

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / reps)
    return statistics.median(times), how


def copy_gbps():
    """Measured device-to-device copy bandwidth (read + write), GB/s."""
    import torch

    # 1 GiB of float32. A 1 GiB uint8 copy measured only 2.7 TB/s on an H200,
    # below the 4.3 TB/s reported for a PyTorch copy on such machines and below
    # what FlashAttention itself reached (4.4 TB/s); byte elements are suspect.
    # Not yet re-measured with float32.
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms, _ = timed_ms(lambda: y.copy_(x), 2, 10)
    return 2 * x.numel() * x.element_size() / ms / 1e6


class Setup:
    """A paged cache holding `lengths` tokens per request, in permuted blocks."""

    def __init__(self, args, lengths, cfg):
        import torch

        from lminf_vllm.rope import default_inv_freq

        self.args, self.cfg = args, cfg
        self.dev = args.device
        self.dtype = getattr(torch, args.dtype)
        Hkv, D, B = args.kv_heads, args.head_size, args.block_size
        rot = args.rotary_dim or D
        self.rotary_dim, self.neox = rot, not args.interleaved
        self.inv_freq = default_inv_freq(10000.0, rot).to(self.dev)
        per_req = [-(-n // B) for n in lengths]
        self.kv_cache = torch.randn(sum(per_req), Hkv, B, 2 * D, dtype=self.dtype, device=self.dev)
        order = torch.randperm(sum(per_req), device=self.dev, dtype=torch.int32)
        self.block_table = torch.zeros(len(lengths), max(per_req), dtype=torch.int32, device=self.dev)
        used = 0
        for r, nb in enumerate(per_req):
            self.block_table[r, :nb] = order[used : used + nb]
            used += nb
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32, device=self.dev)

    def run(self, q_lens, cfg=None):
        """A callable that attends q_lens[r] queries at the end of request r
        (with `cfg`, default the benchmark's)."""
        import torch

        from lminf_vllm.paths.triton.kernels import triton_lambda_attention

        starts = torch.tensor([0] + q_lens, device=self.dev).cumsum(0).to(torch.int32)
        T = int(sum(q_lens))
        a = self.args
        q = torch.randn(T, a.heads, a.head_size, dtype=self.dtype, device=self.dev)
        out = torch.empty_like(q)

        def step():
            triton_lambda_attention(
                q, self.kv_cache, out, starts, self.seq_lens, self.block_table, cfg or self.cfg,
                a.head_size**-0.5, self.inv_freq, self.rotary_dim, self.neox,
                decode_only=all(n == 1 for n in q_lens),
            )  # fmt: skip
            return out

        return step, q


def full_attention(q, k, v):
    """Causal full attention as a callable (layout work done once, outside the
    timing) and its name. q [B, Tq, H, D], k/v [B, Tk, Hkv, D]; the queries are
    the last Tq positions. flash-attn if installed; else SDPA with GQA done by
    the kernel (enable_gqa), or, where the backend refuses that, K/V repeated."""
    import torch

    try:
        from flash_attn import flash_attn_func

        return (lambda: flash_attn_func(q, k, v, causal=True)), "flash_attn"  # causal aligned bottom-right
    except ImportError:
        pass
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    causal = q.shape[1] > 1  # a decode query sees every key; a full prefill is top-left aligned
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]

    def flash(kt, vt, gqa):  # FlashAttention-2 inside PyTorch, never a silent fallback to the math backend
        def fn():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return sdpa(qt, kt, vt, is_causal=causal, enable_gqa=gqa).transpose(1, 2)

        return fn

    try:
        fn = flash(kt, vt, gqa)
        fn()
        return fn, "sdpa-flash" + ("-gqa" if gqa else "")
    except RuntimeError as exc:
        print(f"  (flash SDPA refused enable_gqa, K/V repeated instead: {str(exc)[:120]})")
    group = q.shape[2] // k.shape[2]
    return flash(kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1), False), "sdpa-flash-repeat-kv"


def self_check(args):
    """W = C >= n, G = 0: Λ must equal causal full attention on the same keys."""
    import torch

    from lminf_vllm.config import LminfConfig

    n = 1000 if args.device == "cuda" else 40
    cfg = LminfConfig(global_tokens=0, local_tokens=n, distance_cap=n)
    s = Setup(args, [n], cfg)
    step, q = s.run([n])
    pos = torch.arange(n, device=args.device)
    blocks, rows = s.block_table[0, pos // args.block_size].long(), pos % args.block_size
    kv = s.kv_cache[blocks, :, rows]  # [n, Hkv, 2D]
    D = args.head_size
    fn, _ = full_attention(q[None], kv[None, ..., :D], kv[None, ..., D:])
    err = (step().float() - fn()[0].float()).abs().max().item()
    print(f"self-check (G=0, W=C=n={n}, vs full attention): max error {err:.3g}")
    if err > args.tol:
        raise SystemExit(f"self-check failed: {err:.3g} > --tol {args.tol}")


def decode_rows(args, n, cfg, peak, copy):
    """Λ, full attention, and our kernel as full attention, for --batch decodes at length n."""
    import torch

    from lminf_vllm.config import LminfConfig

    G, W, H, Hkv, D = cfg.global_tokens, cfg.local_tokens, args.heads, args.kv_heads, args.head_size
    el = torch.finfo(getattr(torch, args.dtype)).bits // 8
    s = Setup(args, [n] * args.batch, cfg)
    step, q = s.run([1] * args.batch)
    lam_ms, lam_how = timed_ms(step, args.warmup, args.iters, args.reps)
    as_full, _ = s.run([1] * args.batch, LminfConfig(global_tokens=0, local_tokens=n, distance_cap=n))
    own_ms, own_how = timed_ms(as_full, args.warmup, args.iters, args.reps)
    kk = torch.randn(args.batch, n, Hkv, D, dtype=q.dtype, device=args.device)
    fn, base = full_attention(q[:, None], kk, torch.randn_like(kk))
    full_ms, full_how = timed_ms(fn, args.warmup, args.iters, args.reps)
    keys = min(n, W) + max(0, min(G, n - W))
    per_key = args.batch * Hkv * 2 * D * el
    q_out = 2 * args.batch * H * D * el
    rows = []
    for kind, ms, how, nbytes in (
        ("lambda", lam_ms, lam_how, per_key * keys + q_out),
        (base, full_ms, full_how, per_key * n + q_out),
        ("lambda-as-full", own_ms, own_how, per_key * n + q_out),
    ):
        gbps = nbytes / ms / 1e6
        rows.append(dict(mode="decode", n=n, batch=args.batch, kernel=kind, timing=how, us=ms * 1e3, gbps=gbps,
                         of_peak=gbps / peak if peak else None, of_copy=gbps / copy if copy else None))  # fmt: skip
    return rows


def prefill_rows(args, n, cfg):
    """Λ and causal full attention for one request of n tokens in one call."""
    import torch

    G, W, H, Hkv, D = cfg.global_tokens, cfg.local_tokens, args.heads, args.kv_heads, args.head_size
    s = Setup(args, [n], cfg)
    step, q = s.run([n])
    iters = max(3, args.iters // 4)
    lam_ms, lam_how = timed_ms(step, 1, iters)
    kk = torch.randn(1, n, Hkv, D, dtype=q.dtype, device=args.device)
    fn, base = full_attention(q[None], kk, torch.randn_like(kk))
    full_ms, full_how = timed_ms(fn, 1, iters)
    # Keys each query i sees: its window (min(i + 1, W)) plus the globals before it.
    i = torch.arange(n, dtype=torch.float64)
    seen = float((torch.clamp(i + 1, max=W) + torch.clamp(i - W + 1, min=0).clamp(max=G)).sum())
    rows = []
    for kind, ms, how, flops in (
        ("lambda", lam_ms, lam_how, 4 * H * D * seen),
        (base, full_ms, full_how, 4 * H * D * n * (n + 1) / 2),
    ):
        rows.append(dict(mode="prefill", n=n, kernel=kind, timing=how, ms=ms, tflops=flops / ms / 1e9))
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":  # must be chosen before triton is imported
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from lminf_vllm.config import LminfConfig
    from lminf_vllm.paths.triton.kernels import triton_available

    if not triton_available() or (args.device == "cuda" and not torch.cuda.is_available()):
        raise SystemExit("needs triton and, unless --device cpu, a CUDA GPU")
    name, peak, copy = "cpu (Triton interpreter)", None, None
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
        copy = copy_gbps()
        print(f"{name}: spec peak {peak or '?'} GB/s, measured copy {copy:.0f} GB/s")
    self_check(args)
    cfg = LminfConfig(args.global_tokens, args.local_tokens, args.distance_cap)
    rows = []
    for n in args.lengths:
        if "decode" in args.modes:
            rows += decode_rows(args, n, cfg, peak, copy)
        if "prefill" in args.modes:
            rows += prefill_rows(args, n, cfg)
        for r in rows[-5:]:
            if r["n"] != n:
                continue
            if r["mode"] == "decode":
                frac = f"{r['of_peak']:.0%} of peak" if r["of_peak"] else "peak ?"
                ofc = f", {r['of_copy']:.0%} of copy" if r["of_copy"] else ""
                print(f"decode  n={n:>7} {r['kernel']:>15}: {r['us']:9.1f} us  {r['gbps']:7.0f} GB/s  {frac}{ofc}"
                      f"  [{r['timing']}]", flush=True)  # fmt: skip
            else:
                print(f"prefill n={n:>7} {r['kernel']:>15}: {r['ms']:9.2f} ms  {r['tflops']:7.1f} TFLOP/s"
                      f"  [{r['timing']}]", flush=True)  # fmt: skip
        if args.device == "cuda":
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, peak_gbps=peak, copy_gbps=copy, torch=torch.__version__,
                args={k: str(v) for k, v in vars(args).items()})  # fmt: skip
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
