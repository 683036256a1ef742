"""Let the CPU platform honour a registered CUSTOM attention backend, and name its Ray resource.

Target: vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls and .ray_device_key (the latter only while an lminf engine starts its Ray workers)
Why: on CPU `get_attn_backend_cls` returns CPU_ATTN for every non-MLA request
    and only logs "Cannot use ... backend on CPU", so `--attention-backend lminf`
    would be silently ignored. And `ray_device_key` is empty on CPU, which vLLM's
    Ray code reads as "this platform cannot run Ray": `distributed_executor_backend
    ="ray"` fails with "current platform cpu does not support ray", although every
    Ray node has CPUs and the CPU worker needs nothing from Ray but a place to run.
How: when the selected backend is CUSTOM and a class path is registered for it,
    `get_attn_backend_cls` returns that path; every other request goes to the
    original method. `ray_device_key_cpu()` sets `ray_device_key` to "CPU" (Ray's
    own resource name: each worker's placement-group bundle then holds one CPU of
    a node) and restores the original on exit. It is entered only around the Ray
    executor's start-up of an engine that selects lminf
    (`patch_executor_ray_executor_v2`), so a stock engine still gets vLLM's refusal
    and nothing changes for engines that do not use Ray.
Upstream: CpuPlatform could accept `AttentionBackendEnum.CUSTOM` like the CUDA
    platform does for registered backends, and declare `ray_device_key = "CPU"`
    (with the two Ray-executor changes of `patch_executor_ray_executor_v2.diff`).
Remove when: the CPU platform returns registered CUSTOM backends itself, and
    vLLM's Ray executor runs CPU workers.
"""

import contextlib

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES
RAY_DEVICE_KEY = "CPU"


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


@contextlib.contextmanager
def ray_device_key_cpu():
    """CpuPlatform.ray_device_key == "CPU" inside the block, the original value after it."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.__dict__.get("ray_device_key")  # None: inherited from Platform ("")
    CpuPlatform.ray_device_key = RAY_DEVICE_KEY
    try:
        yield RAY_DEVICE_KEY
    finally:
        if original is None:
            del CpuPlatform.ray_device_key
        else:
            CpuPlatform.ray_device_key = original
