"""The CPU path: vLLM's own C++ attention kernel for most rows of a step.

The cache is in the kernel's layout (kv_layout.CPU_KERNEL_LAYOUT), written by
its own op. Per step, by routing.py's row kinds:
  * plain rows (ALL_KEYS; whole chunks too) and decode rows whose global copies
    find a place (decode.placement) share one kernel call, as virtual sequences;
  * prefill chunks past the window share one scratch cache per step (prefill.py);
  * what is left (GLOBALS_IN_WINDOW rows, decode rows without a place for their
    copies) takes the PyTorch math, reading the same layout.
A step whose every request is plain is vLLM's kernel call exactly as the stock
CPU backend makes it.
"""

from dataclasses import dataclass, field

import torch

from lminf_vllm.kv_layout import CPU_KERNEL_LAYOUT
from lminf_vllm.lambda_attention import RowsPlan, attend_rows, plan_rows
from lminf_vllm.step import EngineShape, LayerMath, StepBatch
from lminf_vllm.paths.cpu_kernel.decode import Copies, KernelCall, placement, plain_call, plan_calls, run_calls
from lminf_vllm.cpu_attention_kernel import write_kv_kernel
from lminf_vllm.paths.cpu_kernel.ops import kernel_mode
from lminf_vllm.paths.cpu_kernel.prefill import PrefillPlan, kernel_isa, plan_prefills, run_prefills
from lminf_vllm.routing import Rows, is_plain, row_kind, row_runs

LAYOUT = CPU_KERNEL_LAYOUT
CUDAGRAPH = "never"


def available(shape: EngineShape) -> bool:
    return _isa(shape) is not None


def _isa(shape: EngineShape) -> str | None:
    return kernel_mode(
        shape.device_type, shape.rope, shape.dtype, shape.block_size, shape.num_kv_heads, shape.head_size
    )


@dataclass
class Plan:
    batch: StepBatch
    shape: EngineShape
    isa: str
    calls: list[KernelCall]  # kernel calls over virtual sequences
    prefills: PrefillPlan | None = None  # the step's prefill chunks past the window, planned once for all layers
    rest: RowsPlan | None = None  # rows for the PyTorch math
    rows_served: dict[str, int] = field(default_factory=dict)  # query rows per way (metrics, tests)
    copies: Copies | None = None  # the global copies the calls read, gathered once per layer


def plan(batch: StepBatch, shape: EngineShape) -> Plan:
    cfg, B, isa = shape.cfg, shape.block_size, _isa(shape)
    table = batch.block_table[: batch.num_reqs]
    kernel_args = (cfg, B, isa, shape.num_heads, shape.num_kv_heads, shape.head_size, shape.dtype)
    if is_plain(batch.max_seq_len, cfg):  # every query sees every key before it: the stock call
        qsl, seq = batch.query_start_loc[: batch.num_reqs + 1], batch.seq_lens[: batch.num_reqs]
        call = plain_call(qsl, seq, table, *kernel_args[2:])
        return Plan(batch, shape, isa, [call], rows_served={"cpu_kernel plain": batch.num_tokens})
    shared, fronts, prefills, rest = [], [], [], []
    served = dict.fromkeys(("cpu_kernel plain", "cpu_kernel after", "cpu_kernel front", "pytorch"), 0)
    for req in batch.requests():
        r, first, count, seq_len = req
        if is_plain(seq_len, cfg):
            shared.append(req)
            served["cpu_kernel plain"] += count
        elif count > 1:
            prefills.append((r, first, first + count, seq_len))
            for a, b, kind in row_runs(seq_len - count, seq_len, cfg):
                kernel = kernel_isa(kind, shape.dtype, B, shape.head_size) is not None
                way = f"cpu_kernel prefill {kind.value}" if kernel else "pytorch"
                served[way] = served.get(way, 0) + b - a
        else:
            where = None if row_kind(seq_len - 1, cfg) is Rows.GLOBALS_IN_WINDOW else placement(seq_len - 1, cfg, B)
            (shared if where == "after" else fronts if where == "front" else rest).append(req)
            served["pytorch" if where is None else f"cpu_kernel {where}"] += 1
    calls, copies = plan_calls(shared, fronts, table, *kernel_args)
    rows = plan_rows(rest, table, cfg, B, LAYOUT) if rest else None
    chunks = plan_prefills(prefills, table, cfg, B, *kernel_args[3:]) if prefills else None
    return Plan(batch, shape, isa, calls, chunks, rows, served, copies)


def run(plan: Plan, layer: LayerMath, query, key, value, kv_cache, output: torch.Tensor) -> None:
    b, cfg = plan.batch, plan.shape.cfg
    write_kv_kernel(kv_cache, key[: b.num_tokens], value[: b.num_tokens], b.slot_mapping[: b.num_tokens], plan.isa)
    if plan.calls:
        run_calls(plan.calls, plan.copies, query, kv_cache, layer.scale, layer.rotary, plan.isa, output)
    if plan.prefills is not None:
        run_prefills(plan.prefills, query, kv_cache, b.block_table, cfg, layer.scale, layer.rotary, LAYOUT, output)
    if plan.rest is not None:
        attend_rows(plan.rest, query, kv_cache, b.block_table, cfg, layer.scale, layer.rotary, None, output)
