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
overwrites the copy before anything reads it. A window of W + G keys then
masks exactly the rows of the first block that precede the window. A decode
query of the kernel sees every key of its sequence, so order does not matter.
No slot is reserved for this: the KV bound of SPEC.md is unchanged.

Rows the kernel can serve:
  * "plain": position i < min(W + G - 1, C): every key 0..i is visible at its
    true distance, which is all Λ-attention asks there (prefill chunks too);
  * "append": decode rows (one query) with i >= W + G - 1 and i % B + G < B:
    the layout above.
The rest (prefill chunks past the window, the G of every B decode steps whose
slots i + 1 .. i + G would leave the block, and the G - 1 decode positions
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

import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.lambda_attention import kernel_layout_views, read_rows
from lminf_vllm.rope import RotarySpec, cos_sin, rotate


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


def kernel_serves(num_queries: int, seq_len: int, cfg: LminfConfig, block_size: int) -> bool:
    """Can the kernel serve a request with these queries this step (a "plain" or an "append" row)?"""
    G, W, C = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    last = seq_len - 1
    plain = last < min(W + G - 1, C)
    return plain or (num_queries == 1 and last >= W + G - 1 and last % block_size + G < block_size)


@dataclass
class KernelPlan:
    """One step's kernel call, shared by every layer (built once by the metadata builder)."""

    tokens: torch.Tensor  # [Tk] long: the batch's query tokens served by the kernel, request by request
    query_start_loc: torch.Tensor  # [Rk + 1] int32, into `tokens`
    seq_lens: torch.Tensor  # [Rk] int32: virtual sequence lengths
    block_table: torch.Tensor  # [Rk, nbv] int32: virtual block tables
    window: int  # the kernel's sliding window: W + G
    scheduler_metadata: torch.Tensor
    # Append rows: where their G re-rotated globals come from and go to.
    glob_blocks: torch.Tensor  # [Ra, G] long: physical block and row of global key j
    glob_rows: torch.Tensor  # [Ra, G] long
    append_slots: torch.Tensor  # [Ra * G] long: flat slots i + 1 .. i + G
    glob_shift: torch.Tensor  # [Ra, G] long: rotate key j forward by d - min(d, C) positions
    # cos/sin of glob_shift per rotary (layers may differ), made by the first layer that needs them
    _cos_sin: dict = field(default_factory=dict)

    def cos_sin(self, rotary: RotarySpec):
        key = id(rotary.inv_freq)
        if key not in self._cos_sin:
            self._cos_sin[key] = cos_sin(self.glob_shift, rotary.inv_freq, torch.float32)
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
) -> KernelPlan | None:
    """The kernel call for `rows` (plain rows first, then append rows), or None if there are none."""
    if not rows:
        return None
    from vllm import _custom_ops as ops
    from vllm import envs

    G, W, C, B = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap, block_size
    plain = [r for r in rows if r[3] - 1 < min(W + G - 1, C)]
    append = [r for r in rows if r[3] - 1 >= W + G - 1]
    assert len(plain) + len(append) == len(rows) and all(r[2] == 1 for r in append)
    ordered = plain + append
    dev = block_table.device
    reqs = torch.tensor([r[0] for r in ordered], dtype=torch.long, device=dev)
    counts = torch.tensor([r[2] for r in ordered], dtype=torch.long, device=dev)
    seq = torch.tensor([r[3] for r in ordered], dtype=torch.long, device=dev)
    is_app = torch.arange(len(ordered), device=dev) >= len(plain)
    # Virtual sequence: from the first window block (block 0 for plain rows) to
    # row i, then the G appended globals.
    first_blk = torch.where(is_app, (seq - W) // B, 0)  # (i - W + 1) // B with i = seq - 1
    vlen = seq - first_blk * B + torch.where(is_app, G, 0)
    nbv = int(((vlen + B - 1) // B).max())
    cols = (first_blk[:, None] + torch.arange(nbv, device=dev)).clamp(max=block_table.shape[1] - 1)
    table = block_table[reqs].gather(1, cols).to(torch.int32)
    qsl = torch.zeros(len(ordered) + 1, dtype=torch.int32, device=dev)
    qsl[1:] = counts.cumsum(0)
    tokens = torch.cat([torch.arange(r[1], r[1] + r[2], device=dev) for r in ordered])
    vlen32 = vlen.to(torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(ordered), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
        seq_lens=vlen32, dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=W + G,
        isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
    )  # fmt: skip

    # Append rows: global key j at distance d = i - j >= W is shown at min(d, C).
    a_reqs, i = reqs[len(plain) :], seq[len(plain) :, None] - 1  # [Ra], [Ra, 1]
    j = torch.arange(G, device=dev)
    glob_blocks = block_table[a_reqs].gather(1, (j // B).expand(len(append), G)).long()
    d = i - j
    slots = ((i + 1 + j) // B).clamp(max=block_table.shape[1] - 1)
    append_slots = (block_table[a_reqs].gather(1, slots).long() * B + (i + 1 + j) % B).flatten()
    return KernelPlan(
        tokens=tokens, query_start_loc=qsl, seq_lens=vlen32, block_table=table, window=W + G,
        scheduler_metadata=metadata, glob_blocks=glob_blocks, glob_rows=(j % B).expand(len(append), G),
        append_slots=append_slots, glob_shift=d - d.clamp(max=C),
    )  # fmt: skip


def kernel_attention(
    query: torch.Tensor,  # [T, H, D] the whole batch
    kv_cache: torch.Tensor,
    plan: KernelPlan,
    scale: float,
    rotary: RotarySpec | None,
    isa: str,
    output: torch.Tensor,  # [T, H, D]: the planned rows are written
) -> None:
    from vllm import _custom_ops as ops

    Ra, G = plan.glob_blocks.shape
    if Ra and G:
        D = query.shape[-1]
        k, v = read_rows(kv_cache, plan.glob_blocks.flatten(), plan.glob_rows.flatten(), D, "cpu_kernel")
        if rotary is not None:
            Hkv = k.shape[1]
            k = k.view(Ra, G, Hkv, D)
            cos, sin = plan.cos_sin(rotary)
            # (cos/sin broadcast over heads)
            k = rotate(k.float(), cos[:, :, None], sin[:, :, None], rotary).to(kv_cache.dtype).view(Ra * G, Hkv, D)
        write_kv_kernel(kv_cache, k.contiguous(), v.contiguous(), plan.append_slots, isa)
    kc, vc = _kernel_views(kv_cache)
    q = query[plan.tokens].contiguous()
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=plan.query_start_loc,
        seq_lens=plan.seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=plan.window,
        block_table=plan.block_table, softcap=0.0, scheduler_metadata=plan.scheduler_metadata, s_aux=None,
    )  # fmt: skip
    output[plan.tokens] = out.to(output.dtype)
