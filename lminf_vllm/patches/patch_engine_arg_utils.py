"""Accept max_model_len past max_position_embeddings when lminf is selected.

Target: vllm.engine.arg_utils.EngineArgs.create_model_config
Why: vLLM refuses `max_model_len > max_position_embeddings` unless the user
    sets VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, because stock RoPE runs off its table.
    With lminf the distance is capped and the table is extended exactly
    (patch_rotary_embedding_base), so long lengths are the point of the plugin.
How: when the engine args select lminf, build the model config with that
    variable set for the duration of the call only; the stock backend keeps
    vLLM's check unchanged.
Upstream: a backend capability ("supports positions past the model's table")
    consulted by `_get_and_verify_max_len`.
Remove when: vLLM asks the attention backend before refusing long lengths.
"""

import os

from lminf_vllm.patches._util import is_patched, replace_attr
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


def apply() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def create_model_config(self):
            if not _requests_lminf(self) or os.environ.get(_ENV):
                return original(self)
            os.environ[_ENV] = "1"
            try:
                return original(self)
            finally:
                del os.environ[_ENV]

        return create_model_config

    return replace_attr(EngineArgs, "create_model_config", make)


def is_applied() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    return is_patched(EngineArgs, "create_model_config")
