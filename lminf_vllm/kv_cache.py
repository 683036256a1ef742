"""The KV cache spec and manager of lminf layers: each sequence keeps its global
blocks and its window, and frees every block in between the moment it leaves.

Thin shells over `block_policy` (the arithmetic, no vLLM). `LminfSpec` is a
`SlidingWindowSpec` with global tokens, so vLLM's start-up pool sizing and
admission control use its per-sequence bound instead of max_model_len.
Registered with vLLM's `KVCacheSpecRegistry` by `register()`.
"""

from dataclasses import dataclass
from typing import ClassVar

from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import KVCacheSpec, SlidingWindowSpec

from lminf_vllm import block_policy
from lminf_vllm.vllm_compat import extra_retained_tokens


@dataclass(frozen=True, kw_only=True)
class LminfSpec(SlidingWindowSpec):
    """sliding_window = W (local_tokens); global_tokens = G."""

    global_tokens: int = 0

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        bound = block_policy.max_blocks_per_sequence(
            self.global_tokens, self.sliding_window, self.block_size,
            in_flight_tokens=max_in_flight_tokens + extra_retained_tokens(self),
        )  # fmt: skip
        return min(bound, block_policy.cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(s, LminfSpec)
            and (s.sliding_window, s.global_tokens) == (self.sliding_window, self.global_tokens)
            for s in kv_cache_specs.values()
        )


class LminfManager(SlidingWindowManager):
    """Frees the gap between the global blocks and the window (RSWAManager frees
    a gap too, but behind a prompt; ours sits behind the first G tokens)."""

    supports_fine_grained_hash_lookup: ClassVar[bool] = False

    def __init__(self, kv_cache_spec: LminfSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.global_tokens = kv_cache_spec.global_tokens
        self.num_freed_blocks = 0  # freed by the Λ policy, for observability
        # The CPU-kernel path writes scratch rows into the null block, by id.
        from lminf_vllm.kv_layout import NULL_BLOCK

        if self.block_pool.null_block.block_id != NULL_BLOCK:
            raise RuntimeError(
                f"vLLM's null block has id {self.block_pool.null_block.block_id}, not {NULL_BLOCK}: "
                "this vLLM version is not supported by lminf"
            )

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int, num_prompt_tokens=None) -> None:
        gap = block_policy.freeable_blocks(
            processed_computed_tokens, self.global_tokens, self.sliding_window, self.block_size
        )
        blocks = self.req_to_blocks.get(request_id)
        if not gap or not blocks:
            return
        # Blocks freed by earlier steps are already null: like vLLM's
        # _remove_blocks_in_range, walk back from the window only to the first one.
        newly = 0
        for i in range(min(gap.stop, len(blocks)) - 1, gap.start - 1, -1):
            if blocks[i].is_null:
                break
            newly += 1
        if not newly:  # most steps: the window has not left a block since the last one
            return
        self._remove_blocks_in_range(request_id, gap.start, gap.stop)
        self.num_freed_blocks += newly

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        # What vLLM calls "skipped" is a dropped prefix; ours is a middle gap,
        # which the allocation arithmetic must not treat as a prefix.
        return 0

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ):
        """Longest prefix whose global and window blocks are all still cached;
        the blocks in between may be gone and come back as null blocks. One
        backward scan (block_policy.longest_cached_prefix): a cold prompt costs
        one lookup when G > 0, at most one per block otherwise."""
        assert isinstance(kv_cache_spec, LminfSpec)
        B, G, W = kv_cache_spec.block_size, kv_cache_spec.global_tokens, kv_cache_spec.sliding_window
        lookups: dict[int, list | None] = {}

        def is_cached(i: int) -> bool:
            lookups[i] = block_pool.get_cached_block(block_hashes[i], kv_cache_group_ids)
            return lookups[i] is not None

        num_blocks = block_policy.longest_cached_prefix(
            min(max_length // B, len(block_hashes)), G, W, B, is_cached,
            aligned=lambda k: (k * B) % alignment_tokens == 0,
        )  # fmt: skip
        null = block_pool.null_block
        hit = tuple([null] * num_blocks for _ in kv_cache_group_ids)
        for i in block_policy.blocks_needed_for_hit(num_blocks, G, W, B):
            blocks = lookups[i] if i in lookups else block_pool.get_cached_block(block_hashes[i], kv_cache_group_ids)
            for group, block in zip(hit, blocks):
                group[i] = block
        if drop_eagle_block and num_blocks:
            for group in hit:
                group.pop()
        return hit, len(hit[0]) * B if hit else 0

    @classmethod
    def reachable_block_mask(cls, *args, **kwargs):
        return None  # every block may serve a hit: keep the dense default


def register_kv_cache_spec() -> None:
    """Map LminfSpec to LminfManager in vLLM's registry (idempotent)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    # The registry fills in vLLM's built-in specs lazily, only while it is
    # empty: make sure that has happened before adding ours.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(LminfSpec, LminfManager, uniform_type_base_spec=LminfSpec)
