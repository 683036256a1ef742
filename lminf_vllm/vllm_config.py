"""Reading lminf's settings out of a vLLM config (front-end and workers alike)."""

import dataclasses
from typing import Any

from lminf_vllm import vllm_compat
from lminf_vllm.config import CONFIG_KEY, LminfConfig, LminfConfigError, check_topk_device, parse_lminf_config
from lminf_vllm.model_support import check_model_supported, uses_alibi

BACKEND_PATH = "lminf_vllm.backend.LminfAttentionBackend"
ALIASES = ("lminf", "LMINF")


def backend_is_lminf(backend: Any) -> bool:
    """True for the enum member, a name or a class path that selects lminf."""
    if backend is None:
        return False
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if isinstance(backend, str):
        if backend in ALIASES or backend == BACKEND_PATH:
            return True
        backend = AttentionBackendEnum.__members__.get(backend.upper())
    return (
        backend is AttentionBackendEnum.CUSTOM
        and backend.is_overridden()
        and backend.get_path() == BACKEND_PATH
    )


def is_lminf_selected(vllm_config: Any) -> bool:
    attention_config = getattr(vllm_config, "attention_config", None)
    return backend_is_lminf(getattr(attention_config, "backend", None))


def check_engine_supported(vllm_config: Any) -> None:
    """Engine features the lminf backend does not implement yet: refused, not ignored."""
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if cache_dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise LminfConfigError(
            f"kv_cache_dtype={cache_dtype!r} is not supported by lminf yet: its cache stores "
            "keys and values unquantized (use kv_cache_dtype=auto)"
        )
    parallel = vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) not in (None, 1):
            raise LminfConfigError(f"{name}={getattr(parallel, name)} is not supported by lminf: it must be 1")
    _check_parallel_on_cpu(parallel)
    # LminfSpec is a SlidingWindowSpec to vLLM: a feature that reads the spec
    # (or drafts past the window) would see the window without the global blocks.
    if getattr(vllm_config, "speculative_config", None) is not None:
        method = getattr(vllm_config.speculative_config, "method", None)
        raise LminfConfigError(
            f"speculative decoding (speculative_config, method={method!r}) is not supported by lminf: "
            "the Λ block manager does not account for draft tokens (lookahead slots, EAGLE's dropped block)"
        )
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    if transfer is not None:
        connector = getattr(transfer, "kv_connector", None)
        raise LminfConfigError(
            f"KV connectors (kv_transfer_config, kv_connector={connector!r}: prefill/decode "
            "disaggregation, KV offloading) are not supported by lminf: a connector would move "
            "the local window without the global blocks"
        )
    events = getattr(vllm_config, "kv_events_config", None)
    if events is not None and getattr(events, "enable_kv_cache_events", False):
        raise LminfConfigError(
            "KV cache events (kv_events_config.enable_kv_cache_events=True) are not supported by "
            "lminf: they would report the Λ cache to external routers as a plain sliding window"
        )


def _check_parallel_on_cpu(parallel: Any) -> None:
    """What vLLM's CPU path cannot run with lminf, refused before any worker starts."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    pipeline = getattr(parallel, "pipeline_parallel_size", 1) or 1
    if pipeline > 1:
        raise LminfConfigError(
            f"pipeline_parallel_size={pipeline} is not supported by lminf on CPU: "
            "vLLM's CPU model runner gives later pipeline stages no intermediate tensors "
            "(their first step fails, with any backend); use tensor_parallel_size"
        )
    import vllm.envs as envs

    if getattr(parallel, "distributed_executor_backend", None) == "ray" and not envs.VLLM_USE_RAY_V2_EXECUTOR_BACKEND:
        raise LminfConfigError(
            "distributed_executor_backend='ray' with VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0 is not supported "
            "by lminf on CPU: vLLM's older Ray executor cannot start CPU workers (unset the variable)"
        )


# Where the engine's resolved (G, W, C) travel with its config, to the engine
# core and every worker: the settings are parsed and checked once per engine.
RESOLVED_KEY = "lminf_resolved"


def lminf_config_from_vllm(vllm_config: Any) -> LminfConfig:
    """The validated (G, W, C) of this engine; raises LminfConfigError with the rule.

    The first call (VllmConfig.__post_init__, patch_config_vllm) checks the model
    and engine and parses the user's settings; it records the result in a copy
    of additional_config, so that every later call (the KV spec, the metadata
    builder, each layer, in any process) reads it back instead."""
    additional = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    if RESOLVED_KEY in additional:
        return LminfConfig(**additional[RESOLVED_KEY])
    check_model_supported(vllm_config.model_config.hf_config)
    check_engine_supported(vllm_config)
    cfg = parse_lminf_config(additional.get(CONFIG_KEY), vllm_config.model_config.hf_text_config)
    if cfg.topk_blocks and uses_alibi(vllm_config.model_config.hf_config):
        raise LminfConfigError(
            f"additional_config.lminf.topk_blocks = {cfg.topk_blocks} is not supported for ALiBi models: "
            "top-k middle blocks need a RoPE model (docs/topk-contract.md, ALiBi); use topk_blocks=0"
        )
    check_topk_device(cfg.topk_blocks, str(getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu")))
    if isinstance(vllm_config.additional_config, dict):  # a copy: the user's dict may serve other engines
        vllm_config.additional_config = {**additional, RESOLVED_KEY: dataclasses.asdict(cfg)}
    return cfg


def topk_store_bytes(vllm_config: Any, tokens: int) -> int:
    """Host bytes the top-k store holds on one rank for a request of `tokens` tokens
    (paths/topk/store.request_bytes with this engine's shape: its layers and KV heads per rank,
    block size and cache dtype)."""
    from lminf_vllm.paths.topk.store import request_bytes

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    int8 = lminf_config_from_vllm(vllm_config).topk_score == "mass_int8"  # (the keys' 8-bit copy too)
    return request_bytes(tokens, model.get_num_layers(parallel), vllm_config.cache_config.block_size,
                         model.get_num_kv_heads(parallel), model.get_head_size(), model.dtype.itemsize,
                         int8=int8)  # fmt: skip


def topk_store_refusal(vllm_config: Any, prompt_tokens: int, max_tokens: int) -> str | None:
    """Why a request can never fit the top-k store's cap alone (None: it can, or no cap): its
    prompt and max_tokens together, as vLLM checks a prompt against max_model_len."""
    cfg = lminf_config_from_vllm(vllm_config)
    cap = cfg.topk_store_max_bytes
    if not cfg.topk_blocks or cap is None:
        return None
    need = topk_store_bytes(vllm_config, prompt_tokens + max_tokens)
    if need <= cap:
        return None
    return (
        f"The request (prompt {prompt_tokens} tokens + max_tokens {max_tokens}) would hold {need} bytes of top-k "
        f"host store, more than additional_config.lminf.topk_store_max_bytes = {cap}. Send a shorter prompt or a "
        "smaller max_tokens (left as none, it is max_model_len minus the prompt)"
    )


# A long prompt must not starve short requests. vLLM's scheduler serves RUNNING
# requests first, and a prompt in chunked prefill takes the whole step budget
# (max_num_batched_tokens) every step until it is done, so a short request that
# arrives meanwhile waits for the whole prefill; with lminf, which serves
# prompts far past the model's context, that can be minutes. vLLM's
# `long_prefill_token_threshold` caps the tokens a request prefills per step
# while other requests are eligible, leaving the rest of the budget to them;
# since 0.32 the cap is lifted while the long request is alone, so a lone
# prompt keeps whole-budget chunks (vllm/v1/core/sched/scheduler.py, schedule()).
# lminf engines get this cap by default; docs/serving.md has the measurement.
LONG_PREFILL_SHARE = 8  # the default cap: max_num_batched_tokens // this (256 of `vllm serve`'s 2048 on CPU)


def default_long_prefill_token_threshold(vllm_config: Any) -> int | None:
    """The per-step prefill cap lminf sets when the user left it unset (0), or None
    where none applies: already set, no chunked prefill, or a vLLM that caps lone prompts."""
    scheduler = vllm_config.scheduler_config
    if scheduler.long_prefill_token_threshold or not scheduler.enable_chunked_prefill:
        return None
    if not vllm_compat.long_prefill_cap_is_lifted_for_a_lone_request():
        return None
    budget = scheduler.max_num_batched_tokens
    # vLLM's own rule (SchedulerConfig.verify_max_model_len): cap <= max_model_len.
    return max(1, min(budget // LONG_PREFILL_SHARE, vllm_config.model_config.max_model_len))


# vLLM reserves most of a CPU machine's memory for KV when not told otherwise
# (gpu_memory_utilization of it). Under lminf a sequence never holds more than
# its bound, so KV beyond max_num_seqs x the bound can never be used: lminf
# engines that leave the size unset on CPU reserve that product instead,
# where it is the smaller.
def default_kv_cache_bytes(vllm_config: Any, per_sequence_bytes: int, total_bytes: int, available_bytes: int):
    """The KV bytes per rank an lminf engine on CPU reserves when the user set none
    (kv_cache_memory_bytes, VLLM_CPU_KVCACHE_SPACE), or None: vLLM's own default."""
    cache = vllm_config.cache_config
    if cache.kv_cache_memory_bytes is not None or vllm_config.device_config.device_type != "cpu":
        return None
    need = vllm_config.scheduler_config.max_num_seqs * per_sequence_bytes
    return need if need < min(cache.gpu_memory_utilization * total_bytes, available_bytes) else None
