"""The mass score's inner loop: each middle block's log-sum-exp, in one pass over the stored keys.

attention.mass_scores needs, per query head h and block b, log sum_{j in b} exp(scale q_C[h] . u_j)
over every middle key u_j of a row (docs/topk-contract.md, "Scoring a middle block"). In PyTorch's
eager ops that is a conversion of the keys to float32 into a buffer, a batched matmul and a
log-sum-exp: three passes, the float32 copy twice the keys' bytes. At 16k tokens the keys of a row
and layer (14k x 3 KV heads x 64 channels in bfloat16, 5.5 MB) come from memory, not a cache, and
those passes took 2.4 ms where one compiled pass takes about 1.0 (a throwaway timing on 40 rows'
keys, 2 threads: docs/topk-contract.md).

`block_lse` is that pass written as PyTorch elementwise math for torch.compile's CPU code
generator (inductor, which vLLM's CPU engine already uses for the model): it fuses the conversion,
the products, the sum over channels and the log-sum-exp over a block's keys into loops that read
each key once. Compiled with dynamic shapes, one compilation serves every chunk size and engine
shape of a dtype. `compiled_ok` compiles it once per (dtype, shape) and holds it to the eager
formula; where compiling fails (no C++ compiler, another torch) or disagrees, or
LMINF_TOPK_COMPILED_MASS=0, the caller keeps the eager ops.
"""

import functools
import logging
import os

import torch

ENV_SWITCH = "LMINF_TOPK_COMPILED_MASS"
logger = logging.getLogger("vllm.lminf")


def block_lse(keys: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
    """keys [n, Hkv, B, D] (any float dtype), q [Hkv, g, D] float32 (KV head h's g query heads)
    -> [n, Hkv, g] float32: per block and query head, the log-sum-exp over the block's B keys of
    scale * q . key. For the compiler only: eager, it would build an [n, Hkv, g, B, D] product."""
    s = (keys.float()[:, :, None, :, :] * q[None, :, :, None, :]).sum(-1) * scale  # [n, Hkv, g, B]
    return torch.logsumexp(s, dim=-1)


def block_lse_eager(keys: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
    """block_lse by eager ops (a float32 copy, a batched matmul): the reference the compiled one is held to."""
    n, Hkv, B, D = keys.shape
    k = keys.float().transpose(0, 1).reshape(Hkv, n * B, D)
    s = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # [Hkv, g, n B]
    return torch.logsumexp(s.view(Hkv, -1, n, B), dim=-1).permute(2, 0, 1)


_compiled = torch.compile(block_lse, dynamic=True)


def compiled(dtype: torch.dtype, num_kv_heads: int, group: int, block_size: int, head_size: int):
    """The compiled block_lse where it serves keys of this dtype and shape, else None."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    return _compiled if compiled_ok(dtype, num_kv_heads, group, block_size, head_size) else None


@functools.cache
def compiled_ok(dtype: torch.dtype, num_kv_heads: int, group: int, block_size: int, head_size: int) -> bool:
    """Compile for this shape (and warm it: the first call compiles, seconds) on random keys of
    several chunk sizes; does it agree with the eager formula to float32 rounding?"""
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(num_kv_heads, group, head_size, generator=g)
        for n in (1, 3):
            keys = torch.randn(n, num_kv_heads, block_size, head_size, generator=g).to(dtype)
            got, want = _compiled(keys, q, 0.3), block_lse_eager(keys, q, 0.3)
            if not torch.allclose(got, want, atol=1e-4, rtol=1e-5):
                logger.warning("lminf top-k: the compiled mass score disagrees with the eager one; using the eager")
                return False
        return True
    except Exception as e:  # no compiler, another torch: the eager ops
        logger.warning("lminf top-k: the mass score's compiled pass is unavailable (%s); using eager ops", e)
        return False
