"""Give lminf attention layers the Λ KV cache spec.

Target: vllm.model_executor.layers.attention.attention.Attention.get_kv_cache_spec
Why: the layer returns a plain FullAttentionSpec unless the model itself has a
    sliding window, and backends are only consulted (`customize_spec`) on the
    sliding-window path; so the KV manager would keep every block of every
    sequence and admission would count max_model_len.
How: for a layer whose impl is lminf's, return `LminfSpec` (a SlidingWindowSpec
    with W = local_tokens and G = global_tokens, block size as configured); its
    manager (registered through vLLM's KVCacheSpecRegistry) frees the blocks
    between the global ones and the window. Other layers: the original method.
Upstream: call `attn_backend.customize_spec()` (or a `get_kv_cache_spec` of the
    backend) on the full-attention path too, as vLLM issue 42449 plans.
Remove when: backends build their layers' KV cache spec.
"""

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.model_executor.layers.attention.attention.Attention.get_kv_cache_spec"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES


def apply() -> bool:
    from vllm.model_executor.layers.attention.attention import Attention

    def make(original):
        def get_kv_cache_spec(self, vllm_config):
            from lminf_vllm.backend import LminfAttentionImpl

            if not isinstance(getattr(self, "impl", None), LminfAttentionImpl):
                return original(self, vllm_config)
            from vllm.v1.kv_cache_interface import get_kv_quant_mode

            from lminf_vllm.kv_cache import LminfSpec

            cfg = self.impl.cfg
            return LminfSpec(
                block_size=vllm_config.cache_config.block_size,
                num_kv_heads=self.num_kv_heads,
                head_size=self.head_size,
                head_size_v=self.head_size_v,
                dtype=self.kv_cache_torch_dtype,
                kv_quant_mode=get_kv_quant_mode(self.kv_cache_dtype),
                sliding_window=cfg.local_tokens,
                global_tokens=cfg.global_tokens,
            )

        return get_kv_cache_spec

    return replace_attr(Attention, "get_kv_cache_spec", make)


def is_applied() -> bool:
    from vllm.model_executor.layers.attention.attention import Attention

    return is_patched(Attention, "get_kv_cache_spec")
