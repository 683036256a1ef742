"""vLLM's CPU attention ops, as this path calls them (the only vLLM calls in the path; the
wrappers it shares with the top-k path are in lminf_vllm/cpu_attention_kernel.py).

`cpu_attention_with_kv_cache` does causal attention over a paged cache with a
sliding window, reading keys in place; `cpu_attn_reshape_and_cache` writes a
cache in the kernel's own layout (kv_layout.CPU_KERNEL_LAYOUT). Whether that
writer stores rows where kv_layout reads them is checked once per shape by a
round trip (`kernel_layout_ok`): a vLLM whose kernel packs keys differently
(AMX bf16, another version) keeps the PyTorch path.
"""

import functools
import os

import torch

from lminf_vllm.cpu_attention_kernel import write_kv_kernel
from lminf_vllm.kv_layout import CPU_KERNEL_LAYOUT, read_rows

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
    """Does the kernel's cache writer store rows where kv_layout.read_rows reads them?"""
    g = torch.Generator().manual_seed(0)
    cache = torch.zeros(3, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    k = torch.randn(5, num_kv_heads, head_size, generator=g).to(dtype)
    v = torch.randn(5, num_kv_heads, head_size, generator=g).to(dtype)
    slots = torch.tensor([0, 1, block_size + 3, 2 * block_size + block_size - 1, 2 * block_size])
    write_kv_kernel(cache, k, v, slots, isa)
    k2, v2 = read_rows(cache, slots // block_size, slots % block_size, head_size, CPU_KERNEL_LAYOUT)
    return torch.equal(k2, k) and torch.equal(v2, v)
