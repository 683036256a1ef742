"""The window branch of a top-k prefill chunk through vLLM's CPU kernel, joined with the far branch.

vLLM's CPU kernel (`cpu_attention_with_kv_cache`, cpu_attention_kernel.py) reads keys
faster than PyTorch's fused CPU attention but returns no log-sum-exp, so the far
branch (attention.py: every key a row sees at i - j >= W) cannot be merged into
its output afterwards. It goes in as one more key, as the CPU-kernel path does
for Λ's global branch (paths/cpu_kernel/prefill.py, where the trick is worked
out): per piece of at most W rows [a, b), a scratch cache holds the virtual
sequence

    [pool keys a - W + 1 .. a - 1] + [one virtual key] + [pool keys a .. b - 1]

read with the kernel's sliding window of W + 1, so that each row sees its W
window keys and the virtual key. Queries are [q_i, λ_i], window keys [k, 0]
with values [v, 0], the virtual key [0, 1] with value [0, 1], λ_i the far
branch's log-sum-exp / scale (rounded to the cache dtype): the kernel returns
[U / Z, m], the window's weighted values and the virtual key's weight, and with
r = e^(scale λ_i) / Z_far the joint softmax is (U / Z + (m / r) o_far) /
(1 - m + m / r). The channel makes the head size the kernel's next one (64 -> 80).

Where the scratch rows come from and the kernel's work split are the same for
every layer: `plan_window` once per chunk and step, `attend_window` per layer.
"""

from dataclasses import dataclass

import numpy as np
import torch

from lminf_vllm.cpu_attention_kernel import attend, kernel_cache_views, scheduler_metadata, write_kv_kernel
from lminf_vllm.kv_layout import read_rows
from lminf_vllm.paths.topk import ops

NO_FAR = -1e4  # the virtual key's score for a row that sees no far key: exp() is 0 beside any real key


@dataclass
class WindowCall:
    """One kernel call for the window branch of chunk rows [s, e)."""

    isa: str
    head_size: int  # the scratch's (Dx)
    source: tuple[torch.Tensor, torch.Tensor]  # (pool block, slot) [N] of each scratch row
    virtual: torch.Tensor  # scratch rows of the virtual keys
    qsl: torch.Tensor
    seq_lens: torch.Tensor
    table: torch.Tensor  # [pieces, width] scratch blocks
    window: int
    metadata: object


def plan_window(s: int, e: int, block_row: torch.Tensor, W: int, B: int, num_heads: int, num_kv_heads: int,
                head_size: int, dtype: torch.dtype) -> WindowCall | None:  # fmt: skip
    """The window call of chunk rows [s, e) (block table block_row, blocks of B), or None where
    the kernel cannot serve it (ops.prefill_kernel)."""
    kernel = ops.prefill_kernel(dtype, head_size)
    if kernel is None or block_row.device.type != "cpu":
        return None
    isa, Dx = kernel
    SB = ops.SCRATCH_BLOCK
    positions, virtual, lens, starts = [], [], [], [0]
    for a in range(s, e, W):
        b = min(a + W, e)
        lo = max(0, a - W + 1)  # the piece's oldest window key
        n = (a - lo) + 1 + (b - a)
        pad = -(-n // SB) * SB - n
        # the virtual key's row and padding rows (never read) stand on a real row, then are overwritten
        positions.append(np.concatenate((np.arange(lo, a), [lo], np.arange(a, b), np.full(pad, lo))))
        virtual.append(starts[-1] + a - lo)
        lens.append(n)
        starts.append(starts[-1] + n + pad)
    pos = torch.from_numpy(np.concatenate(positions))
    table = torch.zeros(len(lens), max(b - a for a, b in zip(starts, starts[1:])) // SB, dtype=torch.int32)
    for n, (a, b) in enumerate(zip(starts, starts[1:])):
        table[n, : (b - a) // SB] = torch.arange(a // SB, b // SB, dtype=torch.int32)
    qsl = torch.tensor(np.cumsum([0] + [min(a + W, e) - a for a in range(s, e, W)]), dtype=torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32)
    metadata = scheduler_metadata(qsl, seq, W + 1, isa, num_heads, num_kv_heads, Dx, dtype)
    return WindowCall(isa, Dx, (block_row[pos // B].long(), pos % B), torch.tensor(virtual), qsl, seq, table, W + 1,
                      metadata)  # fmt: skip


def attend_window(call: WindowCall, q: torch.Tensor, kv_cache: torch.Tensor, layout: str, o_far: torch.Tensor,
                  lse_far: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
    """The chunk's attention: q [T, H, D] (its rows, in the cache dtype); the far branch's outputs
    o_far [T, H, Dv] float32 and log-sum-exps lse_far [T, H] (-inf where a row sees no far key).
    -> [T, H, Dv] float32, one softmax over the window and the far keys."""
    D, Dx = q.shape[-1], call.head_size
    keys, values = read_rows(kv_cache, *call.source, D, layout)  # [N, Hkv, D]
    keys, values = (torch.nn.functional.pad(x, (0, Dx - D)) for x in (keys, values))
    keys[call.virtual], values[call.virtual] = 0, 0
    keys[call.virtual, :, D], values[call.virtual, :, D] = 1, 1
    lse = lse_far.clamp(min=NO_FAR)
    lam = (lse / scale).to(q.dtype)
    q = torch.cat((q, lam[..., None], q.new_zeros(*q.shape[:2], Dx - D - 1)), dim=-1)
    scratch = kv_cache.new_empty(keys.shape[0] // ops.SCRATCH_BLOCK, keys.shape[1], ops.SCRATCH_BLOCK, 2 * Dx)
    write_kv_kernel(scratch, keys, values, torch.arange(keys.shape[0]), call.isa)
    out = torch.empty_like(q)
    attend(q, *kernel_cache_views(scratch), out, call.qsl, call.seq_lens, call.table, call.window, call.metadata,
           scale)  # fmt: skip
    window, m = out[..., :D].float(), out[..., D].float()
    mr = (m / torch.exp(lam.float() * scale - lse))[..., None]  # m / r: the virtual key's weight, made exact
    return (window + mr * o_far) / (1 - m[..., None] + mr)
