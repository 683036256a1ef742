"""Serving most of a CPU batch with vLLM's own C++ attention kernel.

vLLM's CPU kernel (`cpu_attention_with_kv_cache`) does causal attention over a
paged cache with a sliding window; it reads keys in place and is several times
faster than PyTorch ops. Λ-attention is a sliding window plus G global keys
seen at a capped distance, so a query at position i can be handed to it as a
*virtual sequence*:

    [its window blocks, from the one holding i - W + 1, up to row i] + [G globals]

where the G global keys are re-rotated copies (position i - min(i - j, C), so
that the kernel's dot product sees the capped distance), written into the
request's own next G slots, i + 1 .. i + G, when these lie in its last block
(already allocated, private: a block is shared through the prefix cache only
once full). They hold no token yet, and each token that later lands there
overwrites the copy before anything reads it. When they would leave the block
(G of every B steps), the row's window blocks are copied into a scratch cache
with spare blocks after them instead, and the kernel runs a second time on
that. No slot is reserved for this: the KV bound of SPEC.md is unchanged.
A window of W + G keys masks exactly the rows of the first block that precede
the window; a decode query of the kernel sees every key of its sequence, so
the order of the keys does not matter.

Rows the kernel can serve:
  * "plain": position i < min(W + G - 1, C): every key 0..i is visible at its
    true distance, which is all Λ-attention asks there (prefill chunks too);
  * "append": decode rows (one query) with i >= W + G - 1: the layout above.
The rest (prefill chunks past the window, and the G - 1 decode positions
C <= i < W + G - 1 when W + G - 1 > C) stay on the PyTorch path, which reads
the same cache layout.

The cache is then in the kernel's layout (lambda_attention.CPU_KERNEL_LAYOUT)
and written by its `cpu_attn_reshape_and_cache`. The layout is checked on
start-up by a round trip (`kernel_layout_ok`): a vLLM whose kernel packs keys
differently (AMX bf16, another version) keeps the PyTorch path.
"""

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.lambda_attention import read_rows
from lminf_vllm.rope import RotarySpec, cos_sin


# LMINF_CPU_KERNEL=0 keeps every row on the PyTorch path (tests, benchmarks).
ENV_SWITCH = "LMINF_CPU_KERNEL"


def kernel_mode(device_type: str, rope: bool, dtype: torch.dtype, block_size: int, num_kv_heads: int, head_size: int):
    """The ISA string of vLLM's CPU kernel when it can serve lminf layers like these, else None."""
    if device_type != "cpu" or not rope or os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    return _kernel_mode(dtype, block_size, num_kv_heads, head_size)


@functools.lru_cache(maxsize=None)
def _kernel_mode(dtype: torch.dtype, block_size: int, num_kv_heads: int, head_size: int) -> str | None:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa
    except ImportError:
        return None
    if head_size not in CPUAttentionBackend.get_supported_head_sizes() or block_size % 32:
        return None
    isa = _get_attn_isa(dtype, block_size, head_size)
    return isa if kernel_layout_ok(isa, dtype, num_kv_heads, head_size, block_size) else None


def kernel_layout_ok(isa: str, dtype: torch.dtype, num_kv_heads: int, head_size: int, block_size: int) -> bool:
    """Does the kernel's cache writer store rows where kernel_layout_views reads them?"""
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(0)
    cache = torch.zeros(3, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    k = torch.randn(5, num_kv_heads, head_size, generator=g).to(dtype)
    v = torch.randn(5, num_kv_heads, head_size, generator=g).to(dtype)
    slots = torch.tensor([0, 1, block_size + 3, 2 * block_size + block_size - 1, 2 * block_size])
    kc, vc = _kernel_views(cache)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
    k2, v2 = read_rows(cache, slots // block_size, slots % block_size, head_size, "cpu_kernel")
    return torch.equal(k2, k) and torch.equal(v2, v)


def _kernel_views(kv_cache: torch.Tensor):
    """The (key_cache, value_cache) views vLLM's CPU backend passes to its ops."""
    nb, Hkv, B, twoD = kv_cache.shape
    return kv_cache.view(nb, Hkv, 2 * B, twoD // 2).chunk(2, dim=2)


def write_kv_kernel(kv_cache, key, value, slots, isa: str) -> None:
    """Store key/value [T, Hkv, D] at flat slots [T] with the kernel's own writer (slot < 0 skipped)."""
    from vllm import _custom_ops as ops

    kc, vc = _kernel_views(kv_cache)
    ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)


def kernel_serves(num_queries: int, seq_len: int, cfg: LminfConfig) -> bool:
    """Can the kernel serve a request with these queries this step (a "plain" or an "append" row)?"""
    G, W, C = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    last = seq_len - 1
    return last < min(W + G - 1, C) or (num_queries == 1 and last >= W + G - 1)


@dataclass
class KernelCall:
    """One call of the kernel, shared by every layer (planned once per step by the metadata builder)."""

    tokens: torch.Tensor | None  # [Tk] long: the batch's query tokens it serves (None: all, in order)
    query_start_loc: torch.Tensor  # [Rk + 1] int32, into `tokens`
    seq_lens: torch.Tensor  # [Rk] int32: virtual sequence lengths
    block_table: torch.Tensor  # [Rk, nbv] int32: virtual block tables
    window: int  # the kernel's sliding window: W + G
    scheduler_metadata: torch.Tensor
    # Append rows: where their G re-rotated globals come from and go to.
    glob_blocks: torch.Tensor  # [Ra, G] long: physical block of global key j
    glob_k_index: torch.Tensor  # [Ra * G, Hkv, D] long: offsets of its key and value in the flat cache
    glob_v_index: torch.Tensor
    append_slots: torch.Tensor  # [Ra * G] long: flat slots i + 1 .. i + G (in the scratch cache if any)
    glob_shift: torch.Tensor  # [Ra, G] long: rotate key j forward by d - min(d, C) positions
    # Set when the appended globals would leave the request's last block: the
    # call then runs on a scratch cache, row r's blocks at [r * nbv, (r + 1) * nbv):
    # copies of these blocks [Rs, nbs] then zeroed spares for the globals.
    scratch_sources: torch.Tensor | None = None
    # cos/sin of glob_shift per rotary (layers may differ), made by the first layer that needs them
    _cos_sin: dict = field(default_factory=dict)

    def rotation(self, rotary: RotarySpec):
        """(cos, signed sin) over the rotary width [Ra, G, 1, rotary_dim], and the
        feature permutation that pairs each feature with its partner."""
        key = id(rotary.inv_freq)
        if key not in self._cos_sin:
            cos, sin = cos_sin(self.glob_shift, rotary.inv_freq, torch.float32)  # [Ra, G, F]
            half = cos.shape[-1]
            if rotary.is_neox_style:  # (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)
                cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
                perm = torch.cat((torch.arange(half, 2 * half), torch.arange(half)))
            else:  # interleaved pairs
                cos2, sin2 = cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
                perm = torch.arange(2 * half).view(half, 2).flip(-1).flatten()
            self._cos_sin[key] = (cos2[:, :, None], sin2[:, :, None], perm.to(cos.device))
        return self._cos_sin[key]


def plan_kernel(
    rows: list[tuple[int, int, int, int]],  # (request index, first token, query count, seq_len after the step)
    block_table: torch.Tensor,  # [num_reqs, max_blocks]
    cfg: LminfConfig,
    block_size: int,
    isa: str,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
) -> list[KernelCall]:
    """The kernel calls serving `rows` (all of them `kernel_serves`): one in place
    (plain rows, and append rows whose G slots fit in their last block), one on a
    scratch copy (the other append rows). Empty calls are left out."""
    G, W, B = cfg.global_tokens, cfg.local_tokens, block_size
    appends = lambda r: r[3] - 1 >= W + G - 1  # noqa: E731
    fits = lambda r: (r[3] - 1) % B + G < B  # noqa: E731
    in_place = [r for r in rows if not appends(r)] + [r for r in rows if appends(r) and fits(r)]
    spill = [r for r in rows if appends(r) and not fits(r)]
    args = (block_table, cfg, B, isa, num_heads, num_kv_heads, head_size, dtype)
    return [call for call in (_plan_call(in_place, False, *args), _plan_call(spill, True, *args)) if call]


def plain_kernel_call(query_start_loc, seq_lens, block_table, cfg, isa, num_heads, num_kv_heads, head_size, dtype):
    """The call for a batch whose every request is a plain row: vLLM's own metadata as it is."""
    from vllm import _custom_ops as ops
    from vllm import envs

    qsl, seq = query_start_loc.to(torch.int32), seq_lens.to(torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
        seq_lens=seq, dtype=dtype, query_start_loc=qsl, causal=True,
        sliding_window_size=cfg.local_tokens + cfg.global_tokens, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
    )  # fmt: skip
    none = torch.zeros(0, 0, dtype=torch.long, device=seq.device)
    return KernelCall(
        tokens=None, query_start_loc=qsl, seq_lens=seq, block_table=block_table.to(torch.int32),
        window=cfg.local_tokens + cfg.global_tokens, scheduler_metadata=metadata, glob_blocks=none,
        glob_k_index=none, glob_v_index=none, append_slots=none.flatten(), glob_shift=none,
    )  # fmt: skip


def _plan_call(rows, scratch, block_table, cfg, B, isa, num_heads, num_kv_heads, head_size, dtype):
    if not rows:
        return None
    from vllm import _custom_ops as ops
    from vllm import envs

    # Index arithmetic on a handful of rows: numpy, not many tiny torch ops.
    G, W, C = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    req, first_tok, counts, seq = (np.array(col, dtype=np.int64) for col in zip(*rows))
    is_app = seq - 1 >= W + G - 1
    # Virtual sequence: from the first window block (block 0 for plain rows) to
    # row i, then the G appended globals.
    first_blk = np.where(is_app, (seq - W) // B, 0)  # (i - W + 1) // B with i = seq - 1
    vlen = seq - first_blk * B + np.where(is_app, G, 0)
    nbv = int(((vlen + B - 1) // B).max())
    own = block_table.cpu().numpy()[req]  # [R, max_blocks]
    cols = np.minimum(first_blk[:, None] + np.arange(nbv), own.shape[1] - 1)
    table = np.take_along_axis(own, cols, axis=1).astype(np.int64)
    sources = None
    if scratch:  # row r's virtual block k is scratch block r * nbv + k
        real = seq - first_blk * B  # tokens of the row's own blocks in its virtual sequence
        sources = torch.from_numpy(table[:, : int((real + B - 1).max()) // B].copy())
        table = np.arange(len(rows) * nbv).reshape(len(rows), nbv)
    qsl = np.zeros(len(rows) + 1, dtype=np.int32)
    qsl[1:] = np.cumsum(counts)
    tokens = np.concatenate([np.arange(a, a + t) for a, t in zip(first_tok, counts)])

    # Append rows: global key j at distance d = i - j >= W is shown at min(d, C).
    app = np.nonzero(is_app)[0]
    i = seq[app, None] - 1  # [Ra, 1]
    j = np.arange(G)
    glob_blocks = own[app][:, j // B] if G else np.zeros((len(app), 0), dtype=np.int64)
    # Flat offsets in the kernel's layout: per block and head, keys [D, B] then values [B, D].
    Hkv, D = num_kv_heads, head_size
    base = (glob_blocks.reshape(-1, 1, 1) * Hkv + np.arange(Hkv)[:, None]) * (2 * B * D)  # [Ra * G, Hkv, 1]
    row = np.broadcast_to(j % B, (len(app), G)).reshape(-1, 1, 1)
    k_index = base + np.arange(D) * B + row
    v_index = base + B * D + row * D + np.arange(D)
    d = i - j
    p = i + 1 + j - first_blk[app, None] * B  # virtual position of appended global j
    append_slots = (np.take_along_axis(table[app], p // B, axis=1) * B + p % B).reshape(-1)
    dev = block_table.device
    as_tensor = lambda a, t=torch.long: torch.from_numpy(np.array(a)).to(dev, t)  # noqa: E731 (a copy: writable)
    vlen32, qsl32 = as_tensor(vlen, torch.int32), as_tensor(qsl, torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(rows), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
        seq_lens=vlen32, dtype=dtype, query_start_loc=qsl32, causal=True, sliding_window_size=W + G,
        isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
    )  # fmt: skip
    return KernelCall(
        tokens=as_tensor(tokens), query_start_loc=qsl32, seq_lens=vlen32,
        block_table=as_tensor(table, torch.int32), window=W + G, scheduler_metadata=metadata,
        glob_blocks=as_tensor(glob_blocks), glob_k_index=as_tensor(k_index), glob_v_index=as_tensor(v_index),
        append_slots=as_tensor(append_slots), glob_shift=as_tensor(d - np.minimum(d, C)),
        scratch_sources=None if sources is None else sources.to(dev),
    )  # fmt: skip


def kernel_attention(
    query: torch.Tensor,  # [T, H, D] the whole batch
    kv_cache: torch.Tensor,
    calls: list[KernelCall],
    scale: float,
    rotary: RotarySpec | None,
    isa: str,
    output: torch.Tensor,  # [T, H, D]: the planned rows are written
) -> None:
    for call in calls:
        _run_call(query, kv_cache, call, scale, rotary, isa, output)


def _run_call(query, kv_cache, call: KernelCall, scale, rotary, isa, output) -> None:
    from vllm import _custom_ops as ops

    cache = kv_cache
    if call.scratch_sources is not None:
        rows, nbv = call.block_table.shape
        cache = kv_cache.new_empty(rows, nbv, *kv_cache.shape[1:])
        copied = call.scratch_sources.shape[1]
        cache[:, :copied] = kv_cache[call.scratch_sources]
        cache[:, copied:] = 0  # the kernel reads whole blocks: no NaN from uninitialised memory
        cache = cache.view(rows * nbv, *kv_cache.shape[1:])
    Ra, G = call.glob_blocks.shape
    if Ra and G:
        flat = kv_cache.view(-1)
        k, v = flat.take(call.glob_k_index), flat.take(call.glob_v_index)  # [Ra * G, Hkv, D]
        if rotary is not None:
            cos, sin, perm = call.rotation(rotary)
            r = rotary.rotary_dim
            x = k.view(Ra, G, *k.shape[1:])[..., :r].float()
            x = x * cos + x.index_select(-1, perm) * sin
            k = k.clone()
            k.view(Ra, G, *k.shape[1:])[..., :r] = x.to(k.dtype)
        write_kv_kernel(cache, k, v, call.append_slots, isa)
    kc, vc = _kernel_views(cache)
    if call.tokens is None:  # the whole batch, in order: read and write in place
        n = int(call.query_start_loc[-1])
        q, out = query[:n], output[:n]
    else:
        q = query[call.tokens].contiguous()
        out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=call.query_start_loc,
        seq_lens=call.seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=call.window,
        block_table=call.block_table, softcap=0.0, scheduler_metadata=call.scheduler_metadata, s_aux=None,
    )  # fmt: skip
    if call.tokens is not None:
        output[call.tokens] = out.to(output.dtype)
