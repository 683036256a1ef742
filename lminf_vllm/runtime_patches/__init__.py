"""Runtime changes to vLLM internals, one module per vLLM module changed.

Each module documents target, why, how, upstream and removal in its docstring,
names the vLLM versions it was written for, and has an idempotent `apply()`
that keeps the original. `tests/test_patches.py` holds this list against the
files and against `patches/README.md` at the repository root.
"""

from importlib import import_module

PATCH_MODULES = (
    "patch_attention_backends_registry",
    "patch_platforms_cpu",
    "patch_engine_arg_utils",
    "patch_engine_input_processor",
    "patch_config_vllm",
    "patch_attention_layer",
    "patch_model_loader_base_loader",
    "patch_worker_gpu_model_runner",
    "patch_worker_gpu_input_batch",
    "patch_executor_ray_executor_v2",
    "patch_metrics_stats",
    "patch_worker_gpu_worker",
    "patch_core_sched_scheduler",
    "patch_metrics_loggers",
)


def load(name: str):
    return import_module(f"{__name__}.{name}")


def apply_all() -> None:
    from lminf_vllm.versions import installed_vllm_version

    version = installed_vllm_version()
    series = ".".join(version.split("+")[0].split(".")[:2])
    for name in PATCH_MODULES:
        module = load(name)
        if series not in module.VLLM_VERSIONS:
            raise RuntimeError(f"lminf patch {name} was not written for vLLM {version}")
        module.apply()
