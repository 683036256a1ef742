"""The ways of computing Λ-attention, one module each, behind the same surface.

Every path module has:
    LAYOUT             the KV cache layout it reads and writes (kv_layout.py)
    CUDAGRAPH          what CUDA-graph capture it allows: "never" or
                       "uniform_decode" (steps whose requests all decode one token)
    available(shape)   can it serve an engine of this shape on this device?
    plan(batch, shape) -> its Plan, made once per step and shared by every layer
    run(plan, layer, query, key, value, kv_cache, output)
                       store the step's keys and values, attend, write `output`

The metadata builder picks the path once per engine (the cache layout follows
from it) and plans once per step; the backend's forward only calls `run`.
The paths see no vLLM type (`backend.py` turns vLLM's into step.py's); the
CPU-kernel and top-k paths call vLLM's C++ ops, each through its ops.py only.
"""

from types import ModuleType

from lminf_vllm.step import EngineShape


def choose(shape: EngineShape) -> ModuleType:
    """The path for an engine: top-k engines (topk_blocks > 0) their own;
    otherwise Triton on CUDA (RoPE models), vLLM's CPU kernel on CPU where it
    can read our layout, else PyTorch. Imports only what it picks: the CPU
    paths never load triton."""
    if shape.cfg.topk_blocks:
        from lminf_vllm.paths import topk

        return topk
    if shape.device_type == "cuda":
        from lminf_vllm.paths import triton

        if triton.available(shape):
            return triton
    if shape.device_type == "cpu":
        from lminf_vllm.paths import cpu_kernel

        if cpu_kernel.available(shape):
            return cpu_kernel
    from lminf_vllm.paths import pytorch

    return pytorch
