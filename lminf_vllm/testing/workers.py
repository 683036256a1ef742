"""What a vLLM worker says about itself, asked from the front-end through
`LLM.collective_rpc(report)`: run in the worker's own process (a Ray actor, a
multiprocessing worker or in-process), so plugin loading and the attention in
use are read where they happen, not assumed."""

import os


def report(worker) -> dict:
    import torch

    from lminf_vllm import runtime_patches

    worker = getattr(worker, "worker", worker)  # vLLM passes the worker or its wrapper
    runner = worker.model_runner
    context = worker.vllm_config.compilation_config.static_forward_context
    impls = {type(layer.impl) for layer in context.values() if hasattr(layer, "impl")}
    specs = runner.get_kv_cache_spec()
    return {
        "rank": worker.rank,
        "pid": os.getpid(),
        "ray_node_id": _ray_node_id(),
        "patches_applied": {name: runtime_patches.load(name).is_applied() for name in runtime_patches.PATCH_MODULES},
        "attention_impls": sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in impls),
        "kv_cache_specs": sorted({type(spec).__name__ for spec in specs.values()}),
        "kv_heads_per_layer": sorted({spec.num_kv_heads for spec in specs.values()}),
        "kv_cache_shapes": [list(t.shape) for t in runner.kv_caches],
        "kv_cache_bytes": sum(t.numel() * t.element_size() for t in runner.kv_caches),
        "torch_threads": torch.get_num_threads(),
    }


def _ray_node_id():
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
