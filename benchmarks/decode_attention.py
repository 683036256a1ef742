"""Time the PyTorch decode attention alone (no engine): one call of
decode_lambda_attention for a batch of decode queries over a paged cache with
permuted blocks, plan built once as the metadata builder does. (On CPU, vLLM's
own kernel serves most decodes, see paths/cpu_kernel/; this path serves the
rest, and all of them with LMINF_CPU_KERNEL=0.)

    python benchmarks/decode_attention.py --lengths 1024 8192 32768
"""

import argparse
import time

import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.lambda_attention import decode_lambda_attention, plan_decode
from lminf_vllm.rope import RotarySpec, default_inv_freq
from shape_args import add_head_args, add_lminf_args


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--batch", type=int, default=4)
    add_head_args(p)
    add_lminf_args(p)
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = LminfConfig(a.global_tokens, a.local_tokens, a.distance_cap)
    B, D = a.block_size, a.head_size
    rotary = RotarySpec(default_inv_freq(10000.0, D), D, True)
    print(f"batch {a.batch}, {a.heads}/{a.kv_heads} heads of {D}, block {B}, {cfg.describe()}")
    for n in a.lengths:
        per_seq = -(-n // B)
        kv = torch.randn(a.batch * per_seq, a.kv_heads, B, 2 * D)
        table = torch.randperm(a.batch * per_seq).view(a.batch, per_seq).int()
        q = torch.randn(a.batch, a.heads, D)
        plans = plan_decode(torch.full((a.batch,), n), table, cfg, B)
        decode_lambda_attention(q, kv, plans, D**-0.5, rotary)  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.repeats):
            decode_lambda_attention(q, kv, plans, D**-0.5, rotary)
        print(f"context {n:>7}: {(time.perf_counter() - t0) / a.repeats * 1e3:.3f} ms per call")


if __name__ == "__main__":
    main()
