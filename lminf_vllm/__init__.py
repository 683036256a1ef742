"""lminf-vllm: LM-Infinite (arXiv 2308.16137) attention for vLLM.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every
process it starts (front-end, engine core, workers), so it must be cheap and
safe to call many times; heavy imports stay inside it.
"""

__version__ = "0.1.0"


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from lminf_vllm import runtime_patches
    from lminf_vllm.kv_cache import register_kv_cache_spec
    from lminf_vllm.versions import check_vllm_version
    from lminf_vllm.vllm_config import BACKEND_PATH

    check_vllm_version()
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    register_kv_cache_spec()
    runtime_patches.apply_all()
