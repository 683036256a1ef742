"""Extend the RoPE cos/sin table exactly up to max_model_len under lminf.

Target: vllm.model_executor.layers.rotary_embedding.base.RotaryEmbeddingBase._compute_cos_sin_cache
Why: the table has max_position_embeddings rows; the CPU rotary op reads past
    it without a bounds check (inf/nan, and a segfault at position 100000).
    lminf keys are stored rotated at their true position, so positions past
    the table must be exact.
How: when the current vLLM config selects lminf and max_model_len exceeds the
    table, append rows [max_position_embeddings, max_model_len) computed in
    float64 from the layer's own inverse frequencies. Rows inside the table
    stay the stock float32 values, so short sequences match stock bit for bit.
    Cost: max_model_len * rotary_dim values per distinct rotary module.
Upstream: size the table by max_model_len, or compute cos/sin on the fly past it.
Remove when: vLLM's RoPE is defined at every position up to max_model_len.
"""

import torch

from lminf_vllm.patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = (
    "vllm.model_executor.layers.rotary_embedding.base."
    "RotaryEmbeddingBase._compute_cos_sin_cache"
)
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES


def _wanted_rows() -> int | None:
    from vllm.config import get_current_vllm_config_or_none

    from lminf_vllm.vllm_config import is_lminf_selected

    config = get_current_vllm_config_or_none()
    if config is None or config.model_config is None or not is_lminf_selected(config):
        return None
    return config.model_config.max_model_len


def apply() -> bool:
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    from lminf_vllm.rope import cos_sin_table

    def make(original):
        def _compute_cos_sin_cache(self) -> torch.Tensor:
            cache = original(self)
            rows = _wanted_rows()
            if rows is None or rows <= cache.shape[0]:
                return cache
            inv_freq = self._compute_inv_freq(self.base)
            extra = cos_sin_table(cache.shape[0], rows, inv_freq).to(cache.dtype)
            return torch.cat((cache, extra), dim=0)

        return _compute_cos_sin_cache

    return replace_attr(RotaryEmbeddingBase, "_compute_cos_sin_cache", make)


def is_applied() -> bool:
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    return is_patched(RotaryEmbeddingBase, "_compute_cos_sin_cache")
