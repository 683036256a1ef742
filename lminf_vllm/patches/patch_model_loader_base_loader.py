"""Give each lminf attention layer its RoPE, exact at every position.

Target: vllm.model_executor.model_loader.base_loader.process_weights_after_loading
Why: (1) the global branch re-rotates the query by min(i-j, C) - (i-j), which
    needs the layer's own RoPE (inverse frequencies, rotary width, pair layout),
    and an attention backend is never told about the model's rotary module.
    (2) RoPE's cos/sin table has max_position_embeddings rows and the CPU
    rotary op reads past it without a bounds check (inf/nan; a segfault at
    position 100000), while lminf stores keys rotated at their true position.
How: after the original post-load processing, walk the model. For every module
    that owns a `rotary_emb` and an lminf attention child: replace its rotary
    module by a private copy whose table runs to max_model_len, rows past the
    stock table computed in float64 from the module's own inverse frequencies
    (stock rows kept bit for bit; the shared instance from vLLM's get_rope
    cache stays untouched for other engines in the process); then hand the
    attention a RotarySpec of that RoPE. Refuse to start if any lminf attention
    layer is left without one. Cost: max_model_len * rotary_dim table values.
Upstream: size the table by max_model_len (or compute cos/sin past it) and
    pass the layer's positional-encoding parameters to AttentionImpl.
Remove when: vLLM does both.
"""

import copy
import types

import torch

from lminf_vllm.patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.model_executor.model_loader.base_loader.process_weights_after_loading"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES


def rotary_spec_of(rope):
    from lminf_vllm.rope import RotarySpec

    inv_freq = rope._compute_inv_freq(rope.base).to(torch.float64).cpu()
    return RotarySpec(inv_freq=inv_freq, rotary_dim=rope.rotary_dim, is_neox_style=rope.is_neox_style)


def exact_rope(rope, rows: int):
    """A copy of `rope` whose cos/sin table covers positions [0, rows)."""
    from lminf_vllm.rope import cos_sin_table

    table = rope.cos_sin_cache
    if rows <= table.shape[0]:
        return rope
    extra = cos_sin_table(table.shape[0], rows, rope._compute_inv_freq(rope.base))
    private = copy.copy(rope)
    private._buffers = dict(rope._buffers)  # copy.copy would share the buffer dict
    for name, value in vars(rope).items():
        # CustomOp keeps its dispatched forward as a method bound to the original
        if isinstance(value, types.MethodType) and value.__self__ is rope:
            setattr(private, name, types.MethodType(value.__func__, private))
    private.cos_sin_cache = torch.cat((table, extra.to(table.device, table.dtype)), dim=0)
    return private


def bind_rotary(model, max_model_len: int) -> int:
    """Give every lminf attention layer an exact RoPE; returns how many were bound."""
    from vllm.model_executor.layers.attention import Attention

    from lminf_vllm.backend import LminfAttentionImpl

    def lminf_children(module):
        return [c for c in module.children() if isinstance(c, Attention) and isinstance(c.impl, LminfAttentionImpl)]

    private: dict[int, torch.nn.Module] = {}  # one copy per shared rotary instance
    bound = 0
    for module in list(model.modules()):
        rope = getattr(module, "rotary_emb", None)
        children = lminf_children(module) if rope is not None else []
        if not children:
            continue
        if id(rope) not in private:
            private[id(rope)] = exact_rope(rope, max_model_len)
        module.rotary_emb = private[id(rope)]
        spec = rotary_spec_of(module.rotary_emb)
        for child in children:
            child.impl.rotary = spec
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
            bind_rotary(model, model_config.max_model_len)

        return process_weights_after_loading

    return replace_attr(base_loader, "process_weights_after_loading", make)


def is_applied() -> bool:
    from vllm.model_executor.model_loader import base_loader

    return is_patched(base_loader, "process_weights_after_loading")
