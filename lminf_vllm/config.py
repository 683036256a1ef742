"""LM-Infinite parameters (G, W, C): parsing, defaults and rules of SPEC.md.

No vLLM import: the same code validates in the front-end, the engine core and
the workers, and is unit-tested on plain dicts.
"""

from dataclasses import dataclass
from typing import Any, Mapping

CONFIG_KEY = "lminf"  # additional_config["lminf"]
DEFAULT_GLOBAL_TOKENS = 10  # the paper's setting for generation
KNOWN_KEYS = ("global_tokens", "local_tokens", "distance_cap", "topk_blocks", "topk_score", "topk_store_max_bytes",
              "topk_refresh")
# How top-k scores a middle block (docs/topk-contract.md, "Scoring a middle block"): its attention
# mass for the chunk's last row (the default), Quest's bound from per-channel key summaries, or the
# mass from an 8-bit copy of the keys (the store keeps it beside them: paths/topk/sketch.py).
TOPK_SCORES = ("mass", "bound", "mass_int8")
DEFAULT_TOPK_SCORE = "mass"
# A decode row keeps the selection its request's last scoring decode row made while that row is
# fewer than this many positions back (docs/topk-contract.md, "Decode rows keep a selection"):
# fewer scorings, faster decode, but retrieval suffers. 1 (the default): every decode row scores.
DEFAULT_TOPK_REFRESH = 1


class LminfConfigError(ValueError):
    """A configuration the plugin refuses at engine start."""


@dataclass(frozen=True)
class LminfConfig:
    global_tokens: int  # G: the first G tokens stay visible to every query
    local_tokens: int  # W: each query sees the W most recent tokens, itself included
    distance_cap: int  # C: the largest relative distance the model is shown
    # k: middle blocks each (sequence, layer, KV head) reads again per step, from
    # the host store (docs/topk-contract.md); 0 is SPEC.md's Λ-mask, bit for bit.
    topk_blocks: int = 0
    # how a middle block is scored for the selection (TOPK_SCORES); read only when topk_blocks > 0
    topk_score: str = DEFAULT_TOPK_SCORE
    # host bytes the top-k store may hold per rank, all requests together (None: no cap); the
    # scheduler admits requests within it (docs/topk-contract.md, "The store's size")
    topk_store_max_bytes: int | None = None
    # a decode row at i reuses the selection its request's last scoring decode row p made while i - p < this
    topk_refresh: int = DEFAULT_TOPK_REFRESH

    def describe(self) -> str:
        text = (
            f"global_tokens={self.global_tokens} local_tokens={self.local_tokens} "
            f"distance_cap={self.distance_cap}"
        )
        if not self.topk_blocks:
            return text
        cap = "none" if self.topk_store_max_bytes is None else f"{self.topk_store_max_bytes}"
        return text + (f" topk_blocks={self.topk_blocks} topk_score={self.topk_score} topk_refresh={self.topk_refresh}"
                       f" topk_store_max_bytes={cap}")


# The keys vLLM reads a model's length from, in its order; the smallest present
# wins (vllm/transformers_utils/model_arch_config_convertor.py,
# derive_max_model_len_and_key). model_max_length, when set, overrides them.
LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE types whose config length vLLM takes as already scaled: it applies no
# `factor` for them (vllm/config/model.py, _get_and_verify_max_len).
PRESCALED_ROPE_TYPES = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


@dataclass(frozen=True)
class DerivedLength:
    value: int
    source: str  # how it was derived, for the start-up log


def vllm_default_max_model_len(hf_config: Any) -> DerivedLength:
    """The max_model_len stock vLLM 0.32 derives for this model when none is given.

    SPEC.md's default for distance_cap: Λ-attention takes over exactly where
    stock vLLM would stop. Mirrors `_get_and_verify_max_len` with
    max_model_len=None for a generative model (the tokenizer and encoder
    lengths it also consults belong to pooling and encoder models; a model with
    its own sliding window is refused by lminf; the architectures lminf serves
    use vLLM's base config convertor). tests/test_config.py holds this
    against vLLM's own function. One difference: where the config names no
    length at all vLLM assumes 2048, which nobody has checked the model against,
    so lminf asks for distance_cap instead.
    """
    length, key = float("inf"), None
    for name in LENGTH_KEYS:
        value = getattr(hf_config, name, None)
        if value is not None and value < length:
            length, key = value, name
    if getattr(hf_config, "model_max_length", None):
        length, key = hf_config.model_max_length, "model_max_length"
    if key is None:
        raise LminfConfigError(
            f"model config has none of {', '.join(LENGTH_KEYS)}: lminf cannot derive "
            "distance_cap (stock vLLM would assume 2048); set additional_config.lminf.distance_cap"
        )
    source = f"{key}={length}"
    layers = rope_parameter_sets(hf_config)
    if layers and "gemma3" not in str(getattr(hf_config, "model_type", "")):
        factor = 1.0
        for rope in layers:
            rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
            if rope_type not in PRESCALED_ROPE_TYPES:
                factor = rope.get("factor", factor)
        factor = 1.0 if factor is None else factor  # vLLM reads a null factor as 1
        if factor != 1.0:
            length *= factor
            source += f" x rope factor {factor}"
        if any(r.get("rope_type") == "longrope" for r in layers):
            # vLLM starts LongRoPE models at their original length
            original = getattr(hf_config, "original_max_position_embeddings", None)
            if original is not None:
                length, source = original, f"original_max_position_embeddings={original} (longrope)"
    return DerivedLength(int(length), source)


def distance_cap_source(raw: Any, hf_config: Any) -> str:
    """Where this engine's distance_cap comes from, in words (the start-up log)."""
    if isinstance(raw, Mapping) and "distance_cap" in raw:
        return "set by additional_config.lminf.distance_cap"
    derived = vllm_default_max_model_len(hf_config)
    return f"default: the max_model_len stock vLLM derives for this model, {derived.source}"


def rope_parameter_sets(hf_config: Any) -> list[dict]:
    """The RoPE parameters of each layer type (one dict unless nested per layer type)."""
    rope = rope_parameters(hf_config)
    if rope and all(isinstance(v, Mapping) for v in rope.values()):
        return [dict(v) for v in rope.values() if v]
    return [rope] if rope else []


def rope_parameters(hf_config: Any) -> dict:
    """rope_parameters (transformers >= 5) or rope_scaling (older), as a dict."""
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(hf_config, name, None)
        if isinstance(value, Mapping):
            return dict(value)
    return {}


def _int_field(raw: Mapping[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LminfConfigError(
            f"additional_config.lminf.{key} = {value!r} is invalid: it must be an integer"
        )
    return value


def parse_lminf_config(raw: Any, hf_config: Any) -> LminfConfig:
    """Validate the user's `additional_config["lminf"]` against SPEC.md's rules."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise LminfConfigError(
            f"additional_config.lminf = {raw!r} is invalid: it must be an object "
            f"with keys {', '.join(KNOWN_KEYS)}"
        )
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise LminfConfigError(
            f"additional_config.lminf has unknown key(s) {', '.join(map(repr, unknown))}: "
            f"the known keys are {', '.join(KNOWN_KEYS)}"
        )
    if "distance_cap" in raw:
        cap = _int_field(raw, "distance_cap", 0)
    else:
        cap = vllm_default_max_model_len(hf_config).value
    local = _int_field(raw, "local_tokens", cap)
    glob = _int_field(raw, "global_tokens", DEFAULT_GLOBAL_TOKENS)
    if glob < 0:
        raise LminfConfigError(
            f"additional_config.lminf.global_tokens = {glob} is invalid: it must be >= 0"
        )
    if cap < 1:
        raise LminfConfigError(
            f"additional_config.lminf.distance_cap = {cap} is invalid: it must be >= 1"
        )
    if not 1 <= local <= cap:
        raise LminfConfigError(
            f"additional_config.lminf.local_tokens = {local} is invalid: it must satisfy "
            f"1 <= local_tokens <= distance_cap (= {cap})"
        )
    topk = _int_field(raw, "topk_blocks", 0)
    if topk < 0:
        raise LminfConfigError(
            f"additional_config.lminf.topk_blocks = {topk} is invalid: it must be >= 0 (0: off)"
        )
    score = raw.get("topk_score", DEFAULT_TOPK_SCORE)
    if score not in TOPK_SCORES or not isinstance(score, str):
        raise LminfConfigError(
            f"additional_config.lminf.topk_score = {score!r} is invalid: it must be one of "
            f"{', '.join(map(repr, TOPK_SCORES))} (default {DEFAULT_TOPK_SCORE!r})"
        )
    refresh = _int_field(raw, "topk_refresh", DEFAULT_TOPK_REFRESH)
    if refresh < 1:
        raise LminfConfigError(
            f"additional_config.lminf.topk_refresh = {refresh} is invalid: it must be >= 1 (decode positions a "
            "selection is kept for; 1 scores at every step)"
        )
    store_cap = raw.get("topk_store_max_bytes")
    if store_cap is not None:
        store_cap = _int_field(raw, "topk_store_max_bytes", 0)
        if store_cap < 1 or not topk:
            raise LminfConfigError(
                f"additional_config.lminf.topk_store_max_bytes = {store_cap} is invalid: it must be an integer "
                f">= 1 (host bytes per rank) and needs topk_blocks > 0 (topk_blocks = {topk}); leave it out for no cap"
            )
    return LminfConfig(global_tokens=glob, local_tokens=local, distance_cap=cap, topk_blocks=topk, topk_score=score,
                       topk_store_max_bytes=store_cap, topk_refresh=refresh)  # fmt: skip


def check_topk_device(topk_blocks: int, device_type: str) -> None:
    """Top-k middle blocks run on CPU only: the path keeps its host store and summaries in host
    memory and has never run on a GPU, where its tensors would meet on two devices mid-request.
    Refused at start-up instead."""
    if topk_blocks and device_type != "cpu":
        raise LminfConfigError(
            f"additional_config.lminf.topk_blocks = {topk_blocks} is not supported on device {device_type!r} yet: "
            "top-k middle blocks run on CPU only (docs/topk-contract.md); use topk_blocks=0"
        )
