"""Validate lminf's settings and the model when the engine config is made.

Target: vllm.config.vllm.VllmConfig.__post_init__
Why: a wrong G/W/C, an unknown key or a model lminf cannot serve exactly must
    stop the engine at start-up, in the front-end process, with one message
    that names the field and the rule; not crash a worker later.
How: after the original __post_init__, if lminf is the selected backend, parse
    `additional_config["lminf"]` and check the model (LminfConfigError on any
    violation) and log the effective settings once, with where distance_cap
    came from (given, or the max_model_len stock vLLM derives for the model);
    and, if the user left `long_prefill_token_threshold` unset, set it so that
    a long prompt's prefill does not starve short requests (one log line says
    so and how to override it; vllm_config.default_long_prefill_token_threshold);
    and on CPU, if no KV size was given, reserve max_num_seqs x the per-sequence
    bound where that is less than vLLM's default (vllm_config.default_kv_cache_bytes);
    and with topk_blocks > 0, turn prefix caching off (docs/topk-contract.md).
Upstream: a validation hook for attention backends on the final VllmConfig
    (through which the backend would also set its scheduling default).
Remove when: vLLM calls such a hook (e.g. `AttentionBackend.validate_config`).
"""

import logging

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.config.vllm.VllmConfig.__post_init__"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES
logger = logging.getLogger("vllm.lminf")  # under "vllm" so vLLM's log setup shows it


def _sequence_bytes(config, cfg, block_size: int, max_blocks_per_sequence) -> tuple[int, int, int]:
    """(blocks while decoding, blocks with a prefill chunk in flight, bytes of the latter) per sequence and rank."""
    model, parallel = config.model_config, config.parallel_config
    chunk = config.scheduler_config.max_num_batched_tokens
    decoding = max_blocks_per_sequence(cfg.global_tokens, cfg.local_tokens, block_size)
    prefilling = max_blocks_per_sequence(cfg.global_tokens, cfg.local_tokens, block_size, in_flight_tokens=chunk)
    itemsize = model.dtype.itemsize if config.cache_config.cache_dtype == "auto" else 1
    block_bytes = (model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * 2 * model.get_head_size()
                   * block_size * itemsize)  # fmt: skip
    return decoding, prefilling, prefilling * block_bytes


def _kv_bound_line(config, cfg, block_size: int, max_blocks_per_sequence) -> str:
    """What one sequence can hold, in blocks and bytes, and how to size the cache from it."""
    decoding, prefilling, seq_bytes = _sequence_bytes(config, cfg, block_size, max_blocks_per_sequence)
    chunk = config.scheduler_config.max_num_batched_tokens
    length = config.model_config.max_model_len
    if config.device_config.device_type == "cpu":
        length_cost = "it reserves no memory"
    else:  # vLLM's device block table: a column per block of max_model_len per request slot
        table = config.scheduler_config.max_num_seqs * -(-length // block_size) * 4
        length_cost = f"vLLM's block table takes {table / 2**20:,.0f} MiB of device memory for it"
    return (
        f"lminf KV bound: a sequence of any length holds at most {decoding} blocks while decoding "
        f"(ceil(G/B) + ceil(W/B) + 1{' + k' if cfg.topk_blocks else ''}) "
        f"and {prefilling} with a {chunk}-token prefill chunk in flight, "
        f"{seq_bytes / 2**20:.0f} MiB per rank, whatever max_model_len ({length:,}: {length_cost}); "
        f"vLLM's 'Maximum concurrency' line counts requests "
        f"at that bound. Size the cache as sequences x that (kv_cache_memory_bytes, or VLLM_CPU_KVCACHE_SPACE "
        f"in GiB on CPU)"
    )


def _size_kv_cache(config, cfg, block_size: int, max_blocks_per_sequence) -> None:
    """On CPU with no KV size given: max_num_seqs x the bound, where that is less than vLLM would take."""
    import psutil

    from lminf_vllm.vllm_config import default_kv_cache_bytes

    seq_bytes = _sequence_bytes(config, cfg, block_size, max_blocks_per_sequence)[2]
    memory = psutil.virtual_memory()
    size = default_kv_cache_bytes(config, seq_bytes, memory.total, memory.available)
    if size is None:
        return
    config.cache_config.kv_cache_memory_bytes = size
    logger.info(
        "lminf KV cache: %.2f GiB per rank = max_num_seqs %d x the bound (no size was given; vLLM would reserve "
        "%.0f%% of memory, which lminf's sequences cannot use); set kv_cache_memory_bytes or "
        "VLLM_CPU_KVCACHE_SPACE to change it",
        size / 2**30,
        config.scheduler_config.max_num_seqs,
        100 * config.cache_config.gpu_memory_utilization,
    )


def _bound_long_prefills(config) -> None:
    """lminf's default per-step prefill cap, when the user set none (docs/serving.md)."""
    from lminf_vllm.vllm_config import LONG_PREFILL_SHARE, default_long_prefill_token_threshold

    threshold = default_long_prefill_token_threshold(config)
    if threshold is None:
        return
    scheduler = config.scheduler_config
    scheduler.long_prefill_token_threshold = threshold
    scheduler.verify_max_model_len(config.model_config.max_model_len)  # vLLM's own checks, again
    logger.info(
        "lminf scheduling: long_prefill_token_threshold=%d (unset; lminf's default, max_num_batched_tokens=%d / %d): "
        "while other requests wait, a prompt prefills at most %d tokens a step, so a long prompt does not hold up "
        "short requests' first tokens; override with --long-prefill-token-threshold N "
        "(N >= max_num_batched_tokens: vLLM's uncapped chunks)",
        threshold,
        scheduler.max_num_batched_tokens,
        LONG_PREFILL_SHARE,
        threshold,
    )


def _topk_defaults(config, cfg) -> None:
    """Top-k engines: prefix caching off; say what the host store costs (docs/topk-contract.md)."""
    if config.cache_config.enable_prefix_caching:
        config.cache_config.enable_prefix_caching = False
        logger.info(
            "lminf top-k: prefix caching is off (a block's keys depend on how the request that "
            "wrote it was chunked, and the host store only holds blocks this engine computed)"
        )
    from lminf_vllm.paths.topk.store import CHUNK_TOKENS
    from lminf_vllm.vllm_config import topk_store_bytes

    size = (f"{topk_store_bytes(config, CHUNK_TOKENS) / 2**20:.0f} MiB per {CHUNK_TOKENS} tokens"
            if config.cache_config.block_size else "one copy of keys and values")  # fmt: skip
    logger.info(
        "lminf top-k: topk_blocks=%d middle blocks per (sequence, layer, KV head) are read back from a host store, "
        "which keeps every complete block in host memory: %s of a sequence per rank (one copy of keys and values, "
        "and summaries; it grows by that much at a time), freed when the request ends or is preempted; %s",
        cfg.topk_blocks,
        size,
        "no cap (topk_store_max_bytes unset)" if cfg.topk_store_max_bytes is None else
        f"capped at topk_store_max_bytes={cfg.topk_store_max_bytes} per rank: requests wait for room, and one that "
        "could never fit (prompt + max_tokens) is refused",
    )  # fmt: skip
    _warn_past_training_length(config, cfg)


def _warn_past_training_length(config, cfg) -> None:
    """More keys per query than the model was trained on costs perplexity (docs/quality.md)."""
    from lminf_vllm.block_policy import topk_attended_tokens
    from lminf_vllm.config import LminfConfigError, vllm_default_max_model_len

    B = config.cache_config.block_size
    try:
        trained = vllm_default_max_model_len(config.model_config.hf_text_config)
    except LminfConfigError:  # the model names no length (distance_cap was given): nothing to compare with
        return
    attended = topk_attended_tokens(cfg.global_tokens, cfg.local_tokens, B, cfg.topk_blocks) if B else 0
    if attended > trained.value:
        logger.warning(
            "lminf top-k: a query attends up to %d keys (global blocks, local_tokens=%d with the rest of its first "
            "block, topk_blocks=%d blocks of %d), more than the %d this model was trained with (%s): perplexity "
            "can be worse than with topk_blocks=0; a smaller local_tokens or topk_blocks keeps within it "
            "(docs/quality.md)",
            attended, cfg.local_tokens, cfg.topk_blocks, B, trained.value, trained.source,
        )  # fmt: skip


def apply() -> bool:
    from vllm.config.vllm import VllmConfig

    def make(original):
        def __post_init__(self):
            original(self)
            from lminf_vllm.config import CONFIG_KEY
            from lminf_vllm.vllm_config import is_lminf_selected, lminf_config_from_vllm

            if is_lminf_selected(self):
                from lminf_vllm.block_policy import max_blocks_per_sequence

                from lminf_vllm.config import distance_cap_source

                cfg = lminf_config_from_vllm(self)
                raw = (self.additional_config or {}).get(CONFIG_KEY)
                block_size = self.cache_config.block_size
                logger.info(
                    "lminf attention: %s block_size=%s max_model_len=%s; distance_cap %s; local_tokens %s",
                    cfg.describe(),
                    block_size,
                    self.model_config.max_model_len,
                    distance_cap_source(raw, self.model_config.hf_text_config),
                    "set" if isinstance(raw, dict) and "local_tokens" in raw else "defaults to distance_cap",
                )
                if block_size:
                    logger.info("%s", _kv_bound_line(self, cfg, block_size, max_blocks_per_sequence))
                    _size_kv_cache(self, cfg, block_size, max_blocks_per_sequence)
                _bound_long_prefills(self)
                if cfg.topk_blocks:
                    _topk_defaults(self, cfg)
            elif CONFIG_KEY in (self.additional_config or {}):
                logger.warning(
                    "additional_config.lminf is set but the attention backend is not lminf; "
                    "add --attention-backend lminf for it to take effect"
                )

        return __post_init__

    return replace_attr(VllmConfig, "__post_init__", make)


def is_applied() -> bool:
    from vllm.config.vllm import VllmConfig

    return is_patched(VllmConfig, "__post_init__")
