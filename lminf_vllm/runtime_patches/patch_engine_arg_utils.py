"""Accept max_model_len past max_position_embeddings when lminf is selected,
and on CPU resolve `dtype="auto"` to what the CPU computes natively.

Target: vllm.engine.arg_utils.EngineArgs.create_model_config
Why: vLLM refuses `max_model_len > max_position_embeddings` unless the user
    sets VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, because stock RoPE runs off its table.
    With lminf the distance is capped and the table is extended exactly
    (patch_rotary_embedding_base), so long lengths are the point of the plugin.
How: when the engine args select lminf, build the model config while
    `vllm.config.model` sees that variable as set: its `envs` name points to a
    view of `vllm.envs` that answers True for it, for the duration of the call
    only (setting os.environ would not do: vLLM caches its envs after the first
    engine starts). vLLM then warns that positions past the table "lead to
    nan", which lminf's capped distances and exact table make untrue: that
    one warning is held back during the call and one lminf line says why the
    length is fine. The stock backend keeps vLLM's check unchanged.
    Second, on CPU with dtype "auto": vLLM's CPU platform lists bfloat16 first on
    every x86 CPU, so auto gives bfloat16 even where the ISA has no bfloat16
    instructions and every matmul is emulated (3.8x slower than float32 on an
    AVX2 EPYC). There an lminf engine builds its config with float32 instead
    (lminf_vllm/cpu_isa.py decides), and one line says what was chosen, why and
    how to override; an explicit --dtype is kept, stock engines are untouched.
Upstream: a backend capability ("supports positions past the model's table")
    consulted by `_get_and_verify_max_len`.
    For the dtype: CpuPlatform.supported_dtypes ordered by the CPU's ISA.
Remove when: vLLM asks the attention backend before refusing long lengths,
    and its CPU platform prefers float32 on CPUs without bfloat16 instructions.
"""

import logging

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.engine.arg_utils.EngineArgs.create_model_config"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES
_ENV = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"


def _requests_lminf(args) -> bool:
    from lminf_vllm.vllm_config import backend_is_lminf

    attention_config = getattr(args, "attention_config", None)
    if isinstance(attention_config, dict):
        selected = attention_config.get("backend")
    else:
        selected = getattr(attention_config, "backend", None)
    return backend_is_lminf(getattr(args, "attention_backend", None)) or backend_is_lminf(selected)


class _AllowLongMaxModelLen:
    """vllm.envs, except that VLLM_ALLOW_LONG_MAX_MODEL_LEN reads True."""

    def __init__(self, envs):
        self._envs = envs

    def __getattr__(self, name):
        return True if name == _ENV else getattr(self._envs, name)


class _HoldBackLongLengthWarning(logging.Filter):
    """Drops vLLM's warning about positions past the table (true of stock RoPE, not of lminf)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _ENV not in record.getMessage()


def _past_the_table(model_config) -> bool:
    from lminf_vllm.config import LminfConfigError, vllm_default_max_model_len

    try:
        return model_config.max_model_len > vllm_default_max_model_len(model_config.hf_text_config).value
    except LminfConfigError:  # no length in the config (ALiBi): nothing to explain
        return False


def _native_dtype_on_cpu(args, create, config):
    """The model config again with float32 where "auto" gave an emulated bfloat16 (see the docstring)."""
    from vllm.platforms import current_platform

    from lminf_vllm.cpu_isa import auto_dtype

    if not current_platform.is_cpu() or str(args.dtype).lower() != "auto":
        return config
    chosen, why = auto_dtype(config.dtype)
    log = logging.getLogger("vllm.lminf")
    if chosen is None or chosen == config.dtype:
        log.info("lminf: dtype auto -> %s: %s (--dtype float32 or bfloat16 to choose)",
                 str(config.dtype).removeprefix("torch."), why)  # fmt: skip
        return config
    args.dtype = str(chosen).removeprefix("torch.")
    try:
        config = create(args)
    finally:
        args.dtype = "auto"  # the user's arguments read as they were given
    log.info("lminf: dtype auto -> %s: %s (--dtype bfloat16 to choose it anyway)",
             str(config.dtype).removeprefix("torch."), why)  # fmt: skip
    return config


def apply() -> bool:
    from vllm.config import model as model_config_module
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def create_model_config(self):
            if not _requests_lminf(self):
                return original(self)
            envs, quiet = model_config_module.envs, _HoldBackLongLengthWarning()
            model_config_module.envs = _AllowLongMaxModelLen(envs)
            model_config_module.logger.addFilter(quiet)
            try:
                config = _native_dtype_on_cpu(self, original, original(self))
            finally:
                model_config_module.envs = envs
                model_config_module.logger.removeFilter(quiet)
            if _past_the_table(config):
                logging.getLogger("vllm.lminf").info(
                    "max_model_len=%s is past the model's own positions: fine with lminf, which shows "
                    "the model no distance beyond distance_cap and extends RoPE exactly (vLLM's warning "
                    "about NaN past the table is about stock attention)", config.max_model_len,
                )  # fmt: skip
            return config

        return create_model_config

    return replace_attr(EngineArgs, "create_model_config", make)


def is_applied() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    return is_patched(EngineArgs, "create_model_config")
