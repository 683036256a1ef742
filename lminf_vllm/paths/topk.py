"""The top-k path: Λ plus the k best middle blocks per (sequence, layer, KV head), from a host store.

Engines with topk_blocks > 0 take it on any device (docs/topk-contract.md; the
math is topk_attention.py, its oracle testing/topk_reference.py). Per layer
and step:
  1. the step's keys and values go into the paged cache (our own layout);
  2. every block a chunk completes past the global blocks is copied to the
     host store with its summary, before the KV manager can free it and give
     it to another sequence;
  3. per chunk (a decode step is a chunk of one row): its last row's query
     picks the k blocks with the highest bound among the chunk's middle blocks;
  4. one softmax over the pool's global and window blocks and the k picked
     blocks, gathered from the store into a per-sequence buffer of k blocks.
The KV pool and its per-sequence bound are SPEC.md's, unchanged; the picked
blocks are the "+ k" of the contract's device bound. No CUDA graphs: host
lists, a loop over requests.
"""

import weakref
from dataclasses import dataclass, field

import torch

from lminf_vllm.block_policy import first_window_block, global_blocks
from lminf_vllm.kv_layout import OWN_LAYOUT, gather_kv, write_kv
from lminf_vllm.step import EngineShape, LayerMath, StepBatch
from lminf_vllm.topk_attention import angles, attend_chunk, block_summaries, plan_chunk, select_blocks
from lminf_vllm.topk_store import HostStore

LAYOUT = OWN_LAYOUT
CUDAGRAPH = "never"

# One host store per engine (per metadata builder's shape object), kept across steps and
# dropped with the builder. A request's blocks go when vLLM reports it finished, which
# it does with the next step: the last requests an engine served stay until then.
_STORES: dict[int, HostStore] = {}


def available(shape: EngineShape) -> bool:
    return shape.rope and shape.cfg.topk_blocks > 0


def store_of(shape: EngineShape) -> HostStore:
    store = _STORES.get(id(shape))
    if store is None:
        store = _STORES[id(shape)] = HostStore()
        weakref.finalize(shape, _STORES.pop, id(shape), None)  # (the id cannot be reused before that)
    return store


@dataclass
class Plan:
    batch: StepBatch
    shape: EngineShape
    store: HostStore
    chunks: list[tuple[int, int, int, int, str | None]]  # (request, first token, stop, seq_len, request id)
    spans: dict = field(default_factory=dict)  # (request, rotary) -> topk_attention.plan_chunk's spans, made once
    # What the step chose, per (layer, request index): [Hkv, k] blocks (tests, metrics).
    chosen: dict = field(default_factory=dict)

    @property
    def rows_served(self) -> dict[str, int]:
        return {"topk": sum(b - a for _, a, b, _, _ in self.chunks)}


def plan(batch: StepBatch, shape: EngineShape) -> Plan:
    store = store_of(shape)
    store.drop(batch.finished)
    ids = batch.request_ids
    chunks = [(r, a, a + t, n, None if ids is None else ids[r]) for r, a, t, n in batch.requests()]
    return Plan(batch, shape, store, chunks)


def run(plan: Plan, layer: LayerMath, query, key, value, kv_cache, output: torch.Tensor) -> None:
    b, shape = plan.batch, plan.shape
    cfg, B, k = shape.cfg, shape.block_size, shape.cfg.topk_blocks
    layer_key = kv_cache.data_ptr()  # one cache tensor per layer, kept for the engine's life
    write_kv(kv_cache, key[: b.num_tokens], value[: b.num_tokens], b.slot_mapping[: b.num_tokens])
    g = global_blocks(cfg.global_tokens, B)
    empty = torch.zeros(shape.num_kv_heads, 0, dtype=torch.long)
    for r, first, stop, seq_len, rid in plan.chunks:
        s, e = seq_len - (stop - first), seq_len
        row = b.block_table[r]
        spans = plan.spans.get((r, angles.key(layer.rotary)))
        if spans is None:
            spans = plan.spans[(r, angles.key(layer.rotary))] = plan_chunk(
                s, e, row, cfg, B, layer.rotary, kv_cache.shape[-1] // 2
            )
        chosen, store_kv = empty, None
        if rid is not None:
            _store_completed(plan.store, rid, layer_key, kv_cache, row, s, e, g, B, layer)
            f = first_window_block(e - 1, cfg.local_tokens, B)
            if f > g:  # the chunk has middle blocks: choose among them
                lo, hi = plan.store.summaries(rid, layer_key, g, f)
                q_last = query[stop - 1].float()  # rotated to C by the last span's last matrix
                chosen = select_blocks(torch.matmul(q_last, spans[-1].q_cap[-1]), lo, hi, g, k)
                store_kv = (*plan.store.gather(rid, layer_key, chosen), plan.store.gather_at_zero(rid, layer_key, chosen))
                plan.chosen[(layer_key, r)] = chosen
        out = attend_chunk(query[first:stop], spans, kv_cache, LAYOUT, chosen, store_kv, cfg, layer.scale, layer.rotary)
        output[first:stop] = out.to(output.dtype)


def _store_completed(store: HostStore, rid: str, layer_key: int, kv_cache, row, s: int, e: int, g: int, B: int,
                     layer: LayerMath) -> None:  # fmt: skip
    """Copy the blocks this chunk completed (past the global blocks) to the store, with their summaries."""
    b0, b1 = max(g, s // B), e // B
    if b1 <= b0:
        return
    D = kv_cache.shape[-1] // 2
    keys, values = gather_kv(kv_cache, row, b0 * B, b1 * B, D, LAYOUT)
    n = b1 - b0
    keys, values = keys.view(n, B, *keys.shape[1:]), values.view(n, B, *values.shape[1:])
    lo, hi, at_zero = block_summaries(keys, b0, layer.rotary)
    store.put(rid, layer_key, b0, keys, values, lo, hi, at_zero)
