"""Which models lminf serves exactly, checked on the Hugging Face config.

A model outside this list could run, but nobody has held it against the dense
reference, so it is refused at start-up instead of giving silent garbage.
No vLLM import.
"""

from typing import Any

from lminf_vllm.config import LminfConfigError, rope_parameters

# Decoder-only models with RoPE on every layer, each held to a dense reference
# through the real engine (tests/test_model_families.py, test_rope_scaling.py).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",  # full-width RoPE, halves (neox style)
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GPTJForCausalLM",  # partial (rotary_dim), interleaved pairs; vLLM's own model
    "GPTNeoXForCausalLM",  # partial (rotary_pct), halves; run by vLLM's Transformers backend
    "PhiForCausalLM",  # partial (partial_rotary_factor), halves; Transformers backend
    "BloomForCausalLM",  # ALiBi: bias -m * d with the capped d; no table, set distance_cap
)
# ALiBi models among them (no rotary embedding; the Triton kernel has no bias yet).
ALIBI_ARCHITECTURES = ("BloomForCausalLM",)
# Architectures whose RoPE may cover only part of each head.
PARTIAL_ROTARY_ARCHITECTURES = ("GPTJForCausalLM", "GPTNeoXForCausalLM", "PhiForCausalLM")
# ALiBi models not held to a reference (MPT is not in vLLM 0.32 at all).
UNPROVEN_ALIBI_ARCHITECTURES = ("MPTForCausalLM",)
# Scaled RoPE is proven through the engine on these (tests/test_rope_scaling.py).
SCALED_ROPE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# RoPE variants whose frequencies are fixed per position, so the re-rotation is
# exact: llama3 and linear fold their scaling into the frequencies, yarn also
# scales cos/sin (its mscale), which stored keys and queries already carry.
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "yarn")
# Why the remaining RoPE variants are refused (a message per variant).
REFUSED_ROPE_TYPES = {
    "dynamic": "its frequencies depend on the sequence length in Hugging Face "
    "transformers while vLLM tabulates one fixed RoPE, so there is no single "
    "model RoPE to cap distances in",
    "longrope": "it switches between two frequency sets at the original length "
    "(short/long factors), so a key's rotation depends on the sequence length",
}


def uses_alibi(hf_config: Any) -> bool:
    archs = getattr(hf_config, "architectures", None) or []
    return any(a in ALIBI_ARCHITECTURES for a in archs) or bool(getattr(hf_config, "alibi", False))


def check_model_supported(hf_config: Any) -> None:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if any(a in UNPROVEN_ALIBI_ARCHITECTURES for a in archs) or getattr(hf_config, "alibi", False):
        raise LminfConfigError(
            f"model architecture {archs} uses ALiBi position biases, which lminf supports "
            "on BloomForCausalLM only (the one ALiBi model checked against the reference)"
        )
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise LminfConfigError(
            f"model architecture {archs or 'unknown'} is not supported by lminf: "
            f"supported are {', '.join(SUPPORTED_ARCHITECTURES)} (RoPE models checked "
            "against the reference); others need their position encoding handled first"
        )
    if getattr(hf_config, "position_embedding_type", "rope") not in ("rope", None):
        raise LminfConfigError(
            f"model position_embedding_type={hf_config.position_embedding_type!r} is not "
            "supported by lminf: it needs rotary (RoPE) position encoding"
        )
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", window is not None)
    if window is not None and uses_window:
        raise LminfConfigError(
            f"model sliding_window={window} is not supported by lminf: the model has its "
            "own sliding window, which would be applied on top of the Λ-mask; use a "
            "checkpoint without it or set use_sliding_window=false"
        )
    rope = rope_parameters(hf_config)
    if "mrope_section" in rope:
        raise LminfConfigError(
            "model rope_scaling.mrope_section is set: multimodal M-RoPE (3-D positions) "
            "is not supported by lminf"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type in REFUSED_ROPE_TYPES:
        raise LminfConfigError(
            f"model rope_scaling.rope_type={rope_type!r} is not supported by lminf: "
            f"{REFUSED_ROPE_TYPES[rope_type]}"
        )
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise LminfConfigError(
            f"model rope_scaling.rope_type={rope_type!r} is not handled by lminf yet: "
            f"supported are {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type != "default" and not any(a in SCALED_ROPE_ARCHITECTURES for a in archs):
        raise LminfConfigError(
            f"model rope_scaling.rope_type={rope_type!r} on {archs} is not supported by lminf yet: "
            f"scaled RoPE is checked on {', '.join(SCALED_ROPE_ARCHITECTURES)} only"
        )
    partial = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0) and not any(a in PARTIAL_ROTARY_ARCHITECTURES for a in archs):
        raise LminfConfigError(
            f"model partial_rotary_factor={partial} is not handled by lminf yet: only "
            "full-width rotary embeddings are supported for "
            f"{archs} (partial: {', '.join(PARTIAL_ROTARY_ARCHITECTURES)})"
        )


def check_layer_supported(*, sliding_window, logits_soft_cap, sinks, attn_type, decoder, kv_sharing_target_layer_name):
    """Attention-layer features lminf does not implement: refused when the model is built."""
    unsupported = {
        "sliding_window": sliding_window is not None,
        "logits_soft_cap": bool(logits_soft_cap),
        "attention sinks": sinks is not None,
        f"attn_type={attn_type}": attn_type != decoder,
        "kv_sharing_target_layer_name": kv_sharing_target_layer_name is not None,
    }
    bad = [name for name, present in unsupported.items() if present]
    if bad:
        raise ValueError(f"lminf attention does not support this layer's {', '.join(bad)}")
