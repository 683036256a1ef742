"""The prefix-cache lookup of a long cold prompt, on vLLM's own block pool: one scan, not n/B * W/B.

(Its arithmetic, block_policy.longest_cached_prefix, is held to the definition in
test_block_policy.py; the engine's prefix-caching tests, test_bounded_memory.py, run it warm.)
"""

import time

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHash

from lminf_vllm.kv_cache import LminfManager, LminfSpec

B, W, TOKENS = 16, 131_072, 1_000_000  # Llama 3.1's default window (W = C), a 1M-token prompt


@pytest.mark.parametrize("G", [10, 0])
def test_a_cold_million_token_prompt(G):
    pool = BlockPool(num_gpu_blocks=64, enable_caching=True, hash_block_size=B)
    asked = []
    lookup = pool.get_cached_block
    pool.get_cached_block = lambda h, ids: asked.append(h) or lookup(h, ids)
    spec = LminfSpec(block_size=B, num_kv_heads=1, head_size=64, dtype=torch.float32, sliding_window=W,
                     global_tokens=G)  # fmt: skip
    hashes = [BlockHash(i.to_bytes(32, "little")) for i in range(TOKENS // B)]
    start = time.perf_counter()
    hit, tokens = LminfManager.find_longest_cache_hit(hashes, TOKENS, [0], pool, spec, False, B)
    seconds = time.perf_counter() - start
    assert tokens == 0 and hit == ([],)
    # G > 0: block 0 is read by every prefix, so one question settles it; G = 0 (a plain sliding
    # window): each block asked once, where the step-back-and-rebuild lookup asked O(n/B * W/B).
    assert len(asked) == (1 if G else TOKENS // B)
    print(f"G={G}: {len(asked)} lookups, {seconds * 1e3:.1f} ms")
