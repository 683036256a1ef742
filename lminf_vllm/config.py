"""LM-Infinite parameters (G, W, C): parsing, defaults and rules of SPEC.md.

No vLLM import: the same code validates in the front-end, the engine core and
the workers, and is unit-tested on plain dicts.
"""

from dataclasses import dataclass
from typing import Any, Mapping

CONFIG_KEY = "lminf"  # additional_config["lminf"]
DEFAULT_GLOBAL_TOKENS = 10  # the paper's setting for generation
KNOWN_KEYS = ("global_tokens", "local_tokens", "distance_cap")


class LminfConfigError(ValueError):
    """A configuration the plugin refuses at engine start."""


@dataclass(frozen=True)
class LminfConfig:
    global_tokens: int  # G: the first G tokens stay visible to every query
    local_tokens: int  # W: each query sees the W most recent tokens, itself included
    distance_cap: int  # C: the largest relative distance the model is shown

    def describe(self) -> str:
        return (
            f"global_tokens={self.global_tokens} local_tokens={self.local_tokens} "
            f"distance_cap={self.distance_cap}"
        )


def pretraining_length(hf_config: Any) -> int:
    """The model's pretraining length: SPEC.md's default for distance_cap."""
    rope = rope_parameters(hf_config)
    original = rope.get("original_max_position_embeddings") if rope else None
    if original:
        return int(original)
    value = getattr(hf_config, "max_position_embeddings", None)
    if not value:
        raise LminfConfigError(
            "model config has no max_position_embeddings: lminf cannot derive "
            "distance_cap; set additional_config.lminf.distance_cap"
        )
    return int(value)


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
    cap = _int_field(raw, "distance_cap", 0) if "distance_cap" in raw else pretraining_length(hf_config)
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
    return LminfConfig(global_tokens=glob, local_tokens=local, distance_cap=cap)
