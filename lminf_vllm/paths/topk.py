"""The top-k path: Λ plus the k best middle blocks per (sequence, layer, KV head), from a host store.

Engines with topk_blocks > 0 take it, on CPU only (docs/topk-contract.md; the
math is topk_attention.py, its oracle testing/topk_reference.py). Per layer
and step:
  1. the step's keys and values go into the paged cache (our own layout);
  2. every block a chunk completes (the global blocks too) is copied to the
     host store with its summary, before the KV manager can free it and give
     it to another sequence;
  3. per chunk (a decode step is a chunk of one row): its last row's query
     picks the k blocks with the highest bound among the chunk's middle blocks;
  4. one softmax over the pool's global and window blocks and the k picked
     blocks, gathered from the store into a per-sequence buffer of k blocks.
A decode row past the first middle block takes a shorter way (attend_decode):
the pool gives only its window, the store everything else, at position 0.
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
from lminf_vllm.topk_attention import (
    angles,
    attend_chunk,
    attend_decode,
    block_summaries,
    decodes_fast,
    plan_chunk,
    plan_decode,
    select_from_bounds,
)
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
    decodes: dict = field(default_factory=dict)  # (request, rotary) -> plan_decode's row (or None), made once
    # What the step chose, per (layer, request index): [Hkv, k] blocks (tests, metrics).
    chosen: dict = field(default_factory=dict)

    @property
    def host_store_bytes(self) -> int:
        """The engine's host store after this step's drops (metrics.py's gauge)."""
        return self.store.nbytes()

    @property
    def rows_served(self) -> dict[str, int]:
        cfg, B = self.shape.cfg, self.shape.block_size
        fast = sum(1 for _, a, b, n, rid in self.chunks
                   if b - a == 1 and rid is not None and decodes_fast(n - 1, cfg, B))  # fmt: skip
        rows = {"topk": sum(b - a for _, a, b, _, _ in self.chunks) - fast, "topk decode": fast}
        return {way: n for way, n in rows.items() if n}


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
    for r, first, stop, seq_len, rid in plan.chunks:
        s, e = seq_len - (stop - first), seq_len
        row = b.block_table[r]
        if rid is not None:
            _store_completed(plan.store, rid, layer_key, kv_cache, row, s, e, B, layer)
            if stop - first == 1 and _decode(plan, layer, r, rid, e - 1, row, query, kv_cache, output, first):
                continue
        spans = plan.spans.get((r, angles.key(layer.rotary)))
        if spans is None:
            spans = plan.spans[(r, angles.key(layer.rotary))] = plan_chunk(
                s, e, row, cfg, B, layer.rotary, kv_cache.shape[-1] // 2
            )
        chosen, store_kv = torch.zeros(shape.num_kv_heads, 0, dtype=torch.long), None
        f = first_window_block(e - 1, cfg.local_tokens, B)
        if rid is not None and f > g:  # the chunk has middle blocks: choose among them
            q_last = query[stop - 1].float()  # rotated to C by the last span's last matrix
            bounds = plan.store.bounds(rid, layer_key, g, f)
            chosen = select_from_bounds(torch.matmul(q_last, spans[-1].q_cap[-1]), bounds, g, k)
            at_zero, values, keys = plan.store.gather_far(rid, layer_key, chosen, with_keys=True)
            store_kv = (keys, values, at_zero)
            plan.chosen[(layer_key, r)] = chosen
        out = attend_chunk(query[first:stop], spans, kv_cache, LAYOUT, chosen, store_kv, cfg, layer.scale, layer.rotary)
        output[first:stop] = out.to(output.dtype)


def _decode(plan: Plan, layer: LayerMath, r: int, rid: str, i: int, row, query, kv_cache, output, t: int) -> bool:
    """A decode row the fast way (topk_attention.attend_decode); False where it does not apply."""
    cfg, B, D = plan.shape.cfg, plan.shape.block_size, kv_cache.shape[-1] // 2
    key = (r, angles.key(layer.rotary))
    if key not in plan.decodes:
        plan.decodes[key] = plan_decode(i, row, cfg, B, kv_cache.shape[1], layer.rotary, D)
    dec = plan.decodes[key]
    if dec is None:
        return False
    layer_key, g = kv_cache.data_ptr(), dec.far_blocks.shape[1] - 1
    q = query[t].float()
    q_cap = torch.matmul(q, dec.q_cap)
    chosen = select_from_bounds(q_cap, plan.store.bounds(rid, layer_key, g, dec.fa), g, cfg.topk_blocks)
    plan.chosen[(layer_key, r)] = chosen
    blocks = torch.cat((dec.far_blocks, chosen), dim=1)
    far = plan.store.gather_far(rid, layer_key, blocks, with_keys=cfg.distance_cap > cfg.local_tokens)
    output[t] = attend_decode(q, q_cap, dec, kv_cache, far, blocks, cfg, layer.scale).to(output.dtype)
    return True


def _store_completed(store: HostStore, rid: str, layer_key: int, kv_cache, row, s: int, e: int, B: int,
                     layer: LayerMath) -> None:  # fmt: skip
    """Copy the blocks this chunk completed to the store, with their summaries (the global
    blocks too: decode reads them from there, rotated back to position 0)."""
    b0, b1 = s // B, e // B
    if b1 <= b0:
        return
    D = kv_cache.shape[-1] // 2
    keys, values = gather_kv(kv_cache, row, b0 * B, b1 * B, D, LAYOUT)
    n = b1 - b0
    keys, values = keys.view(n, B, *keys.shape[1:]), values.view(n, B, *values.shape[1:])
    lo, hi, at_zero = block_summaries(keys, b0, layer.rotary)
    store.put(rid, layer_key, b0, keys, values, lo, hi, at_zero)
