"""The CUDA path: the whole batch in one call of the Triton kernels (kernels.py).

No host work per step or per layer: the plan is views of vLLM's own metadata
tensors (persistent buffers, so a captured CUDA graph reads the next step's
values on replay), the KV write has no host synchronisation, and the kernels'
launch grids depend on tensor shapes only. ALiBi models (no bias in the
kernels yet) take the PyTorch path.
"""

from dataclasses import dataclass

import torch

from lminf_vllm.kv_layout import OWN_LAYOUT, write_kv_no_sync
from lminf_vllm.step import EngineShape, LayerMath, StepBatch
from lminf_vllm.paths.triton.kernels import triton_available, triton_lambda_attention

LAYOUT = OWN_LAYOUT
# Full graphs for steps of one-token decodes (the kernels' tile sizes depend on
# that flag); mixed steps run piecewise, attention outside the graph.
CUDAGRAPH = "uniform_decode"


def available(shape: EngineShape) -> bool:
    return shape.device_type == "cuda" and shape.rope and triton_available()


@dataclass
class Plan:
    batch: StepBatch
    shape: EngineShape
    decode_only: bool  # every request has one query: smaller tiles

    @property
    def rows_served(self) -> dict[str, int]:
        return {"triton": self.batch.num_tokens}


def plan(batch: StepBatch, shape: EngineShape) -> Plan:
    return Plan(batch, shape, decode_only=batch.max_query_len == 1)


def run(plan: Plan, layer: LayerMath, query, key, value, kv_cache, output: torch.Tensor) -> None:
    b = plan.batch
    n = min(key.shape[0], b.slot_mapping.shape[0])  # tensor shapes: no host sync
    write_kv_no_sync(kv_cache, key[:n], value[:n], b.slot_mapping[:n])
    rotary = layer.rotary
    triton_lambda_attention(
        query, kv_cache, output, b.query_start_loc[: b.num_reqs + 1], b.seq_lens[: b.num_reqs],
        b.block_table[: b.num_reqs], plan.shape.cfg, layer.scale, layer.inv_freq, rotary.rotary_dim,
        rotary.is_neox_style, decode_only=plan.decode_only,
    )  # fmt: skip
