"""The PyTorch path: every row through lambda_attention's math, any device, any model.

The reference-like path: ALiBi models, CUDA without Triton, and CPU builds
whose kernel cannot read our layout take it. Host lists and a loop over
prefill chunks: no CUDA graphs.
"""

from dataclasses import dataclass

import torch

from lminf_vllm.kv_layout import OWN_LAYOUT, write_kv
from lminf_vllm.lambda_attention import RowsPlan, attend_rows, plan_rows
from lminf_vllm.step import EngineShape, LayerMath, StepBatch

LAYOUT = OWN_LAYOUT
CUDAGRAPH = "never"


def available(shape: EngineShape) -> bool:
    return True


@dataclass
class Plan:
    batch: StepBatch
    shape: EngineShape
    rows: RowsPlan

    @property
    def rows_served(self) -> dict[str, int]:
        return {"pytorch": self.rows.num_rows}


def plan(batch: StepBatch, shape: EngineShape) -> Plan:
    table = batch.block_table[: batch.num_reqs]
    return Plan(batch, shape, plan_rows(batch.requests(), table, shape.cfg, shape.block_size, LAYOUT))


def run(plan: Plan, layer: LayerMath, query, key, value, kv_cache, output: torch.Tensor) -> None:
    n = plan.batch.num_tokens
    write_kv(kv_cache, key[:n], value[:n], plan.batch.slot_mapping[:n])
    table = plan.batch.block_table
    attend_rows(plan.rows, query, kv_cache, table, plan.shape.cfg, layer.scale, layer.rotary, layer.alibi, output)
