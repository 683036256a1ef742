"""Let the CPU platform honour a registered CUSTOM attention backend.

Target: vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls
Why: on CPU it returns CPU_ATTN for every non-MLA request and only logs
    "Cannot use ... backend on CPU", so `--attention-backend lminf` would be
    silently ignored.
How: when the selected backend is CUSTOM and a class path is registered for
    it, return that path; every other request goes to the original method.
Upstream: CpuPlatform could accept `AttentionBackendEnum.CUSTOM` like the CUDA
    platform does for registered backends.
Remove when: the CPU platform returns registered CUSTOM backends itself.
"""

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES


def apply() -> bool:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    def make(original):
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            if selected_backend is AttentionBackendEnum.CUSTOM and selected_backend.is_overridden():
                return selected_backend.get_path()
            return original(cls, selected_backend, attn_selector_config, num_heads)

        return classmethod(get_attn_backend_cls)

    return replace_attr(CpuPlatform, "get_attn_backend_cls", make)


def is_applied() -> bool:
    from vllm.platforms.cpu import CpuPlatform

    return is_patched(CpuPlatform, "get_attn_backend_cls")
