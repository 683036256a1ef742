"""Where a token's key and value live in a layer's paged KV cache.

One tensor per layer, allocated by vLLM as [num_blocks, num_kv_heads, block_size,
2 * head_size]; a token at position p of a request lives in block
block_table[p // B], row p % B. Two layouts of that tensor:
    OWN_LAYOUT: key = kv_cache[..., :head_size], value = kv_cache[..., head_size:]
        (the PyTorch and Triton paths);
    CPU_KERNEL_LAYOUT: vLLM's CPU attention kernel's: per block and head, the keys
        transposed [head_size, block_size], then the values [block_size, head_size]
        (written by that kernel's own op, see paths/cpu_kernel/ops.py).
No vLLM import.
"""

import torch

OWN_LAYOUT = "own"
CPU_KERNEL_LAYOUT = "cpu_kernel"


def kernel_layout_views(kv_cache: torch.Tensor):
    """(keys [nb, Hkv, D, B], values [nb, Hkv, B, D]) views of a CPU_KERNEL_LAYOUT cache."""
    nb, Hkv, B, twoD = kv_cache.shape
    halves = kv_cache.view(nb, Hkv, 2, B * twoD // 2)
    return halves[:, :, 0].view(nb, Hkv, twoD // 2, B), halves[:, :, 1].view(nb, Hkv, B, twoD // 2)


def read_rows(kv_cache: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor, head_size: int, layout: str):
    """Keys and values of the cache rows (blocks[i], rows[i]): ([N, Hkv, D], [N, Hkv, Dv]), copies."""
    if layout == CPU_KERNEL_LAYOUT:
        k, v = kernel_layout_views(kv_cache)
        return k[blocks, :, :, rows], v[blocks, :, rows]
    kv = kv_cache[blocks, :, rows]
    return kv[..., :head_size], kv[..., head_size:]


def read_blocks(kv_cache: torch.Tensor, blocks: torch.Tensor, layout: str) -> torch.Tensor:
    """Whole blocks [..., B, Hkv, 2D] (key | value per row) for block ids [...], a copy."""
    if layout == CPU_KERNEL_LAYOUT:
        k, v = kernel_layout_views(kv_cache)
        return torch.cat((k[blocks].permute(*range(blocks.dim()), -1, -3, -2), v[blocks].transpose(-2, -3)), dim=-1)
    return kv_cache[blocks].transpose(-2, -3)


def token_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of a contiguous OWN_LAYOUT cache [nb, Hkv, B, 2D] as [N, Hkv, D] views
    whose row `block * Hkv * B + slot` is that slot (`token_numbers`); N keeps them inside it."""
    if not kv_cache.is_contiguous():
        raise ValueError("the KV cache must be contiguous to be viewed per token")
    nb, Hkv, B, two_d = kv_cache.shape
    n, off = (nb - 1) * Hkv * B + B, kv_cache.storage_offset()
    shape, strides = (n, Hkv, two_d // 2), (two_d, B * two_d, 1)
    return kv_cache.as_strided(shape, strides, off), kv_cache.as_strided(shape, strides, off + two_d // 2)


def token_numbers(blocks: torch.Tensor, slots: torch.Tensor, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """token_views' rows of (physical block, slot) pairs."""
    return blocks.long() * (num_kv_heads * block_size) + slots


def block_head_numbers(blocks: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[Hkv, n]: row h holds head h's rows, block * Hkv + h, of blocks [n] (every head's) or [Hkv, n]
    (row h: head h's own) in a tensor laid out [blocks, Hkv, B, ...] viewed as [blocks * Hkv, B, ...]
    (an OWN_LAYOUT cache, HostStore.block_heads): one block of one KV head per row."""
    return torch.add(torch.arange(num_kv_heads, device=blocks.device)[:, None], blocks.long(), alpha=num_kv_heads)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Store key/value [T, Hkv, D] at flat slots [T] (slot = block * B + row; < 0 = padding)."""
    write_kv_at(kv_cache, key, value, write_index(slots, kv_cache.shape[2]))


def write_index(slots: torch.Tensor, block_size: int):
    """Where write_kv puts tokens at flat slots (OWN_LAYOUT; < 0 = padding, dropped), worked out
    once for all layers of a step: (the kept tokens, None when all are; their blocks; their
    rows). One host sync."""
    keep = slots >= 0
    kept = None if bool(keep.all()) else keep.nonzero()[:, 0]
    slots = (slots if kept is None else slots[kept]).long()
    return kept, slots // block_size, slots % block_size


def write_kv_at(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index) -> None:
    """write_kv with write_index's answer for these tokens."""
    kept, blocks, rows = index
    if kept is not None:
        key, value = key[kept], value[kept]
    head_size = key.shape[-1]
    kv_cache[blocks, :, rows, :head_size] = key.to(kv_cache.dtype)
    kv_cache[blocks, :, rows, head_size:] = value.to(kv_cache.dtype)


def gather_kv(kv_cache, block_row, start: int, stop: int, head_size: int, layout: str = OWN_LAYOUT):
    """Keys and values of positions [start, stop) of one request: ([L, Hkv, D], [L, Hkv, Dv])."""
    block_size = kv_cache.shape[2]
    pos = torch.arange(start, stop, device=kv_cache.device)
    return read_rows(kv_cache, block_row[pos // block_size].long(), pos % block_size, head_size, layout)


NULL_BLOCK = 0  # vLLM's null block: never given to a request (LminfManager checks the id)


def write_kv_no_sync(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """write_kv without a host synchronisation (CUDA graphs): padding slots (< 0)
    write into the null block's first row, which no request ever reads."""
    block_size, head_size = kv_cache.shape[2], key.shape[-1]
    slots = slots.long().clamp(min=NULL_BLOCK * block_size)
    blocks, rows = slots // block_size, slots % block_size
    kv_cache[blocks, :, rows, :head_size] = key.to(kv_cache.dtype)
    kv_cache[blocks, :, rows, head_size:] = value.to(kv_cache.dtype)
