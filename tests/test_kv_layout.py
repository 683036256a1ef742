"""kv_layout's row numbers, held to the rows they name. No engine, no vLLM."""

import pytest
import torch

from lminf_vllm.kv_layout import block_head_numbers


@pytest.mark.parametrize("Hkv, B", [(1, 4), (3, 16)])
def test_block_head_numbers_name_each_heads_slice_of_a_block(Hkv, B):
    """Row h: head h's slice kv_cache[block, h] of each block, in the cache viewed [blocks * Hkv, B, 2D],
    for blocks every head reads ([n]) and for each head's own ([Hkv, n])."""
    g = torch.Generator().manual_seed(Hkv)
    nb, D = 7, 4
    cache = torch.randn(nb, Hkv, B, 2 * D, generator=g)
    shared = torch.tensor([5, 0, 3, 3], dtype=torch.int32)
    own = torch.randint(0, nb, (Hkv, 4), generator=g)
    for blocks in (shared, own):
        rows = block_head_numbers(blocks, Hkv)
        assert rows.shape == (Hkv, 4) and rows.dtype == torch.long
        per_head = blocks.long().expand(Hkv, -1)
        want = torch.stack([cache[per_head[h], h] for h in range(Hkv)])
        assert torch.equal(cache.view(nb * Hkv, B, 2 * D)[rows], want)
