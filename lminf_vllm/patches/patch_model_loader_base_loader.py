"""Tell each lminf attention layer which rotary embedding its queries carry.

Target: vllm.model_executor.model_loader.base_loader.process_weights_after_loading
Why: the global branch re-rotates the query by min(i-j, C) - (i-j), which needs
    the layer's own RoPE (inverse frequencies, rotary width, pair layout); an
    attention backend is never told about the model's rotary module.
How: after the original post-load processing, walk the model: for every module
    that owns a `rotary_emb` and an lminf attention child, hand that child a
    RotarySpec built from the module's RoPE; then refuse to start if any lminf
    attention layer was left without one.
Upstream: pass the layer's positional-encoding parameters to AttentionImpl.
Remove when: vLLM gives attention backends the layer's rotary embedding.
"""

from lminf_vllm.patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.model_executor.model_loader.base_loader.process_weights_after_loading"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES


def rotary_spec_of(rope):
    import torch

    from lminf_vllm.rope import RotarySpec

    inv_freq = rope._compute_inv_freq(rope.base).to(torch.float64).cpu()
    return RotarySpec(inv_freq=inv_freq, rotary_dim=rope.rotary_dim, is_neox_style=rope.is_neox_style)


def bind_rotary(model) -> int:
    """Bind every lminf attention layer to its sibling rotary embedding; returns the count."""
    from vllm.model_executor.layers.attention import Attention

    from lminf_vllm.backend import LminfAttentionImpl

    bound = 0
    for module in model.modules():
        rope = getattr(module, "rotary_emb", None)
        if rope is None:
            continue
        for child in module.children():
            if isinstance(child, Attention) and isinstance(child.impl, LminfAttentionImpl):
                child.impl.rotary = rotary_spec_of(rope)
                bound += 1
    missing = [
        name
        for name, m in model.named_modules()
        if isinstance(m, Attention) and isinstance(m.impl, LminfAttentionImpl) and m.impl.rotary is None
    ]
    if missing:
        raise ValueError(
            f"lminf cannot serve this model: attention layer(s) {missing[:3]} have no "
            "rotary embedding beside them (lminf needs RoPE on every attention layer)"
        )
    return bound


def apply() -> bool:
    from vllm.model_executor.model_loader import base_loader

    def make(original):
        def process_weights_after_loading(model, model_config, target_device):
            original(model, model_config, target_device)
            bind_rotary(model)

        return process_weights_after_loading

    return replace_attr(base_loader, "process_weights_after_loading", make)


def is_applied() -> bool:
    from vllm.model_executor.model_loader import base_loader

    return is_patched(base_loader, "process_weights_after_loading")
