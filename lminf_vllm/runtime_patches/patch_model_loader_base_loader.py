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
    module by a private copy that forms the step's cos/sin from the step's
    positions (`rope.StepCosSin`): stock table rows for positions inside the
    stock table (bit for bit), float64 angles from the module's own inverse
    frequencies past it, scaling included. No table grows with max_model_len
    (a 2^30-token engine holds the stock table and nothing more); the shared
    instance from vLLM's get_rope cache stays untouched for other engines in
    the process. Scalings: llama3 and linear fold into the frequencies, yarn
    adds its mscale on cos/sin; other rotary classes are refused, and the
    frequencies must reproduce the stock table before they are trusted. Then
    hand the attention a RotarySpec of that RoPE. Models run by vLLM's
    Transformers backend (GPT-NeoX, Phi) have one transformers rotary module
    instead, which forms cos/sin on the fly in float32: its forward is
    replaced by a float64 one (checked against the original) and its RoPE
    bound to every lminf layer. Refuse to start if any lminf attention layer
    is left without one, unless it has ALiBi slopes (BLOOM), whose bias needs
    no RoPE. Cost: per step, tokens * rotary_dim / 2 float64 angles, formed
    once and reused by every layer in eager mode on the host (about 2 ms
    for a chunk of 2,048 tokens, 50 us for one decode token, on this CPU).
Upstream: compute cos/sin past the table from the positions (in every scaled
    subclass too), and pass the layer's positional-encoding parameters to
    AttentionImpl; in transformers, form RoPE angles in float64.
Remove when: vLLM does both.
"""

import copy
import types

import torch

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.model_executor.model_loader.base_loader.process_weights_after_loading"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES
# Table rows compared with the exact RoPE at start-up: a wrong scaling shows in
# the first few; more would only cost time and memory on 128k-row tables.
CHECKED_ROWS = 8192


def scaled_inv_freq(rope) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, cos/sin factor) of a vLLM rotary module, its scaling included.

    Taken from the module's own `_compute_inv_freq`, whose argument and meaning
    differ by class; a class not listed here is refused, not guessed.
    """
    from lminf_vllm.config import LminfConfigError

    kind = type(rope).__name__
    if kind in ("RotaryEmbedding", "Llama3RotaryEmbedding"):
        return rope._compute_inv_freq(rope.base), 1.0
    if kind == "LinearScalingRotaryEmbedding":
        if len(rope.scaling_factors) != 1:
            raise LminfConfigError(
                f"rope_scaling linear with several factors {rope.scaling_factors} is not supported by lminf"
            )
        # the table rotates position t by t / factor: fold the factor into the frequencies
        return rope._compute_inv_freq(rope.base) / rope.scaling_factors[0], 1.0
    if kind == "YaRNScalingRotaryEmbedding":
        return rope._compute_inv_freq(rope.scaling_factor), rope.mscale
    raise LminfConfigError(
        f"rotary embedding {kind} is not supported by lminf: its positions cannot be "
        "re-rotated exactly (supported: default, llama3, linear and yarn RoPE)"
    )


def rotary_spec_of(rope):
    from lminf_vllm.rope import RotarySpec

    inv_freq, scaling = scaled_inv_freq(rope)
    spec = RotarySpec(
        inv_freq=inv_freq.to(torch.float64).cpu(),
        rotary_dim=rope.rotary_dim,
        is_neox_style=rope.is_neox_style,
        attention_scaling=float(scaling),
    )
    check_spec_reproduces_table(spec, rope.cos_sin_cache, type(rope).__name__)
    return spec


def check_spec_reproduces_table(spec, table: torch.Tensor, kind: str) -> None:
    """Refuse to start if the spec's RoPE is not the one vLLM tabulated.

    A scaling handled wrongly moves angles by O(1) within a few rows; the
    tolerance only admits the table's own rounding (its dtype, and float32
    angles p * inv_freq off by about p * inv_freq * 1.2e-7).
    """
    from lminf_vllm.config import LminfConfigError
    from lminf_vllm.rope import cos_sin_table

    if table.shape[0] == 0 or table.shape[1] != spec.rotary_dim:
        raise LminfConfigError(f"lminf cannot read the RoPE table of {kind} (shape {tuple(table.shape)})")
    rows = min(table.shape[0], CHECKED_ROWS)
    table = table[:rows]
    exact = cos_sin_table(0, rows, spec.inv_freq, spec.attention_scaling)
    angle_error = torch.arange(rows, dtype=torch.float64)[:, None] * spec.inv_freq.max() * 2.4e-7
    tol = 1e-3 + 4 * torch.finfo(table.dtype).eps * spec.attention_scaling + angle_error
    worst = ((table.double().cpu() - exact).abs() - tol).max().item()
    if worst > 0:
        raise LminfConfigError(
            f"lminf's RoPE for {kind} does not reproduce vLLM's cos/sin table "
            f"(off by {worst:.3g} beyond rounding): this scaling is not supported"
        )


def step_rope(rope, spec):
    """A private copy of `rope` whose forward forms cos/sin for the step's positions.

    The copy keeps the stock table (same tensor) and everything else; only its
    dispatched forward changes, so vLLM's own op still rotates (its CPU or CUDA
    kernel where the stock module would use it, forward_static otherwise).
    """
    from lminf_vllm.rope import StepCosSin

    private = copy.copy(rope)
    # copy.copy would share the buffer and submodule dicts with the stock instance
    private._buffers, private._modules = dict(rope._buffers), dict(rope._modules)
    for name, value in vars(rope).items():
        # CustomOp keeps its dispatched forward as a method bound to the original
        if isinstance(value, types.MethodType) and value.__self__ is rope:
            setattr(private, name, types.MethodType(value.__func__, private))
    private.step_cos_sin = StepCosSin(rope.cos_sin_cache, spec.inv_freq, spec.attention_scaling)
    private._forward_method = rotate_with_step_table(private, uses_vllm_kernel(rope))
    return private


def uses_vllm_kernel(rope) -> bool:
    """Whether the stock module dispatches to vLLM's rotary kernel (CPU or CUDA),
    as CustomOp.dispatch_forward decides; otherwise it runs forward_native."""
    from vllm.platforms import current_platform

    enabled = getattr(rope, "_enforce_enable", False) or rope.enabled()
    return enabled and (current_platform.is_cpu() or current_platform.is_cuda())


def rotate_with_step_table(rope, kernel: bool):
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    def forward(positions, query, key=None):
        table, rows = rope.step_cos_sin(positions.flatten(), query.dtype)
        if kernel:
            from vllm import _custom_ops as ops

            ops.rotary_embedding(rows, query, key, rope.head_size, table, rope.is_neox_style)  # in place
            return query, key
        return RotaryEmbedding.forward_static(rows, query, key, rope.head_size, rope.rotary_dim, table, rope.is_neox_style)

    return forward


def bind_rotary(model) -> int:
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
            spec = rotary_spec_of(rope)
            private[id(rope)] = (step_rope(rope, spec), spec)
        module.rotary_emb, spec = private[id(rope)]
        for child in children:
            child.impl.rotary = spec
            bound += 1
    bound += bind_transformers_rotary(model)
    missing = [
        name
        for name, m in model.named_modules()
        if isinstance(m, Attention) and isinstance(m.impl, LminfAttentionImpl) and m.impl.rotary is None and m.impl.alibi_slopes is None
    ]
    if missing:
        raise ValueError(
            f"lminf cannot serve this model: attention layer(s) {missing[:3]} have no "
            "rotary embedding beside them (lminf needs RoPE or ALiBi on every attention layer)"
        )
    return bound


def bind_transformers_rotary(model) -> int:
    """Models run by vLLM's Transformers backend (GPT-NeoX, Phi): one transformers
    rotary module feeds every layer, and it computes cos/sin on the fly (no
    table, so no bounds), in float32. Make its angles float64-exact and bind
    its RoPE to every lminf layer still unbound. Its pairs are halves
    (rotate_half): model_support admits only such architectures here.
    """
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    from lminf_vllm.backend import LminfAttentionImpl
    from lminf_vllm.rope import RotarySpec, exact_hf_rotary_forward

    unbound = [
        m
        for m in model.modules()
        if isinstance(m, Attention) and isinstance(m.impl, LminfAttentionImpl) and m.impl.rotary is None and m.impl.alibi_slopes is None
    ]
    ropes = [
        m
        for m in model.modules()
        if not isinstance(m, RotaryEmbeddingBase) and hasattr(m, "inv_freq") and hasattr(m, "attention_scaling")
    ]
    if not unbound or len(ropes) != 1:
        return 0  # none to bind, or ambiguous: bind_rotary refuses the unbound layers
    rope = ropes[0]
    check_exact_forward_matches(rope)
    rope.forward = exact_hf_rotary_forward(rope)
    inv_freq = rope.inv_freq.to(torch.float64).cpu()
    spec = RotarySpec(inv_freq, 2 * inv_freq.numel(), True, float(rope.attention_scaling))
    for layer in unbound:
        layer.impl.rotary = spec
    return len(unbound)


def check_exact_forward_matches(rope) -> None:
    """The float64 forward must equal transformers' own within its float32 rounding."""
    from lminf_vllm.config import LminfConfigError
    from lminf_vllm.rope import exact_hf_rotary_forward

    rows = min(int(getattr(rope, "original_max_seq_len", 0) or CHECKED_ROWS), CHECKED_ROWS)
    positions = torch.arange(rows, device=rope.inv_freq.device)[None]
    probe = torch.empty(0, dtype=torch.float32, device=rope.inv_freq.device)
    with torch.no_grad():
        stock, exact = rope.forward(probe, positions), exact_hf_rotary_forward(rope)(probe, positions)
    tol = 1e-3 + rows * float(rope.inv_freq.max()) * 2.4e-7
    worst = max((a.double() - b.double()).abs().max().item() for a, b in zip(stock, exact))
    if worst > tol:
        raise LminfConfigError(
            f"lminf's RoPE for {type(rope).__name__} does not reproduce transformers' "
            f"(off by {worst:.3g}): this rotary embedding is not supported"
        )


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
