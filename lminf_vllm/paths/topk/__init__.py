"""The top-k path: Λ plus the k best middle blocks per (sequence, layer, KV head), from a host store.

Engines with topk_blocks > 0 take it, on CPU only (docs/topk-contract.md; the
math is paths/topk/attention.py, its oracle testing/topk_reference.py). Per layer
and step:
  1. the step's keys and values go into the paged cache (our own layout);
  2. every block a chunk completes (the global blocks too) is copied to the
     host store with its summary, before the KV manager can free it and give
     it to another sequence;
  3. per chunk (a decode step is a chunk of one row): its last row's query
     picks the k blocks with the highest score among the chunk's middle blocks
     (topk_score: attention mass, from the keys or their 8-bit copy, or Quest's bound);
  4. one softmax over the pool's global and window blocks and the k picked
     blocks, gathered from the store (a per-layer workspace).
A decode row past the first middle block takes a shorter way: its window as
stored, every other key it sees from the store's copies at position 0. In
bfloat16 and float16 engines vLLM's decode op (ops.py) reads every row's window
in one call per layer, joined by log-sum-exps with the other keys: where C = W,
read in place from the store by far_kernel's C++ pass; where C > W (or that pass
cannot be built), in PyTorch. Otherwise the PyTorch math (attend_decode), row by
row. The device pool holds what Λ's does (ceil(G/B) + ceil(W/B) + 1 blocks per
sequence): every middle key is read from the host store. No CUDA graphs: host
lists, a loop over requests.
"""

import weakref
from dataclasses import dataclass, field

import torch

from lminf_vllm.block_policy import first_window_block, global_blocks
from lminf_vllm.kv_layout import OWN_LAYOUT, gather_kv, token_views, write_index, write_kv_at
from lminf_vllm.step import EngineShape, LayerMath, StepBatch
from lminf_vllm.paths.topk.attention import (
    angles,
    attend_chunk,
    attend_decode,
    block_summaries,
    decodes_fast,
    far_part,
    far_scores,
    kept_selection,
    merge_two,
    plan_chunk,
    plan_decode,
    select_decode_rows,
    select_stored,
)
from lminf_vllm.paths.topk import far_kernel, mass_kernel, ops
from lminf_vllm.paths.topk.store import HostStore, chunk_blocks
from lminf_vllm.paths.topk.window import plan_window

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
        store = _STORES[id(shape)] = HostStore(int8=shape.cfg.topk_score == "mass_int8")
        store.limit = shape.cfg.topk_store_max_bytes  # (the scheduler admits within it: past it is a bug)
        weakref.finalize(shape, _forget, id(shape))  # (the id cannot be reused before that)
        if shape.cfg.topk_score == "mass":  # build the C++ passes now, not in a request's first step
            mass_kernel.usable(shape.dtype)
        if shape.cfg.topk_score == "mass_int8":
            mass_kernel.sketch_kernel_ok()
        if shape.cfg.distance_cap == shape.cfg.local_tokens:
            far_kernel.usable(shape.dtype)
    return store


def _forget(key: int) -> None:
    _STORES.pop(key, None)


@dataclass
class Plan:
    batch: StepBatch
    shape: EngineShape
    store: HostStore
    chunks: list[tuple[int, int, int, int, str | None]]  # (request, first token, stop, seq_len, request id)
    spans: dict = field(default_factory=dict)  # (request, rotary) -> attention.plan_chunk's spans, made once
    windows: dict = field(default_factory=dict)  # request -> window.plan_window's call (or None), made once
    decodes: dict = field(default_factory=dict)  # (request, rotary) -> plan_decode's row (or None), made once
    # What the step chose, per (layer, request index): [Hkv, k] blocks (tests, metrics).
    chosen: dict = field(default_factory=dict)
    window_op: bool = False  # decode rows' windows through vLLM's decode op (ops.py)
    steps: dict = field(default_factory=dict)  # rotary -> the step's DecodeStep, made once
    write_at: tuple | None = None  # kv_layout.write_index of the step's tokens, made once

    @property
    def host_store_bytes(self) -> int:
        """The engine's host store after this step's drops (metrics.py's gauge)."""
        return self.store.nbytes()

    @property
    def rows_served(self) -> dict[str, int]:
        cfg, B = self.shape.cfg, self.shape.block_size
        fast = sum(1 for _, a, b, n, rid in self.chunks
                   if b - a == 1 and rid is not None and decodes_fast(n - 1, cfg, B))  # fmt: skip
        decode = "topk decode op" if self.window_op else "topk decode"
        rows = {"topk": sum(b - a for _, a, b, _, _ in self.chunks) - fast, decode: fast}
        return {way: n for way, n in rows.items() if n}


class MissingRequestIds(RuntimeError):
    """A top-k step whose requests the path cannot name: it would lose every middle block."""


def plan(batch: StepBatch, shape: EngineShape) -> Plan:
    if batch.request_ids is None and not batch.dummy:
        raise MissingRequestIds(
            f"lminf top-k (additional_config.lminf.topk_blocks={shape.cfg.topk_blocks}) cannot serve this step: "
            f"{batch.missing}. Without request ids it cannot keep or read the requests' middle blocks; "
            "use topk_blocks=0 with this runner"
        )
    store = store_of(shape)
    store.drop(batch.finished)
    ids = batch.request_ids
    chunks = [(r, a, a + t, n, None if ids is None else ids[r]) for r, a, t, n in batch.requests()]
    window_op = ops.usable(shape.dtype, shape.num_heads, shape.num_kv_heads, shape.head_size, shape.block_size)
    return Plan(batch, shape, store, chunks, window_op=window_op)


def run(plan: Plan, layer: LayerMath, query, key, value, kv_cache, output: torch.Tensor) -> None:
    b, shape = plan.batch, plan.shape
    cfg, B = shape.cfg, shape.block_size
    layer_key = _layer_key(layer, kv_cache)
    if plan.write_at is None:
        plan.write_at = write_index(b.slot_mapping[: b.num_tokens], B)
    write_kv_at(kv_cache, key[: b.num_tokens], value[: b.num_tokens], plan.write_at)
    g = global_blocks(cfg.global_tokens, B)
    decodes = []  # (request index, request id, token, DecodeRow): the decode way, after the loop
    for r, first, stop, seq_len, rid in plan.chunks:
        s, e = seq_len - (stop - first), seq_len
        row = b.block_table[r]
        if rid is not None:
            _store_completed(plan.store, rid, layer_key, kv_cache, row, s, e, B, layer)
            dec = _decode_row(plan, layer, r, e - 1, row, kv_cache) if stop - first == 1 else None
            if dec is not None:
                decodes.append((r, rid, first, dec))
                continue
        spans = plan.spans.get((r, angles.key(layer.rotary)))
        if spans is None:
            spans = plan.spans[(r, angles.key(layer.rotary))] = plan_chunk(
                s, e, row, cfg, B, layer.rotary, kv_cache.shape[-1] // 2
            )
        chosen, store_kv = torch.zeros(shape.num_kv_heads, 0, dtype=torch.long), None
        f = first_window_block(e - 1, cfg.local_tokens, B)
        if rid is not None and f > g:  # the chunk has middle blocks: choose among them
            kept, decode_row = None, stop - first == 1 and cfg.topk_refresh > 1
            if decode_row:  # a decode row may keep its request's last selection
                kept = kept_selection(plan.store, rid, layer_key, e - 1, min(cfg.topk_blocks, f - g), cfg)
            if kept is None:
                q_last = query[stop - 1].float()  # rotated to C by the last span's last matrix
                q_cap = torch.matmul(q_last, spans[-1].q_cap[-1])
                chosen = select_stored(plan.store, rid, layer_key, q_cap, g, f, cfg, layer.scale)
                if decode_row:  # (a longer chunk's selection serves its own rows only)
                    plan.store.keep(rid, layer_key, e - 1, chosen)
            else:
                chosen = kept
            store_kv = plan.store.gather_far(rid, layer_key, chosen)
            plan.chosen[(layer_key, r)] = chosen
        if r not in plan.windows:  # the window branch's kernel call, once per chunk and step (None: PyTorch's)
            plan.windows[r] = plan_window(s, e, row, cfg.local_tokens, B, shape.num_heads, shape.num_kv_heads,
                                          kv_cache.shape[-1] // 2, kv_cache.dtype)  # fmt: skip
        out = attend_chunk(query[first:stop], spans, kv_cache, LAYOUT, chosen, store_kv, cfg, layer.scale, layer.rotary,
                           plan.windows[r])  # fmt: skip
        output[first:stop] = out.to(output.dtype)
    if decodes:
        _decode(plan, layer, decodes, query, kv_cache, output)


def _decode_row(plan: Plan, layer: LayerMath, r: int, i: int, row, kv_cache):
    """The decode way's plan for a row at i (made once per step), None where it does not apply."""
    key = (r, angles.key(layer.rotary))
    if key not in plan.decodes:
        cfg, B, D = plan.shape.cfg, plan.shape.block_size, kv_cache.shape[-1] // 2
        plan.decodes[key] = plan_decode(i, row, cfg, B, kv_cache.shape[1], layer.rotary, D)
    return plan.decodes[key]


@dataclass
class DecodeStep:
    """The step's decode rows that take the short way, stacked once and shared by the layers
    (of one rotary): what does not change between layers is not redone per layer."""

    rows: list  # (request index, request id, token, DecodeRow)
    tokens: torch.Tensor  # [R] the rows' tokens in the batch
    q_cap: torch.Tensor  # [R, D, D]: row r's query rotated to C is q @ q_cap[r]
    lead: bool = False  # the rows are the batch's first R tokens, in order (vLLM puts decodes first)
    windows: torch.Tensor | None = None  # [R, W] int32 window_tokens (with the op, without far_kernel)
    window_call: ops.ListedCall | None = None  # the op over every row's window (without far_kernel)
    far_blocks: torch.Tensor | None = None  # [R, Hkv, g + 1] with far_kernel: each row's global blocks, block fa
    far_counts: torch.Tensor | None = None  # [R, g + 1 + k] the keys each reads of them and of its k picks
    segments: torch.Tensor | None = None  # [R, nw, 3] with far_kernel: each row's window_segments (count 0: none)
    splits: int = 1  # far_kernel's work items a row

    @classmethod
    def make(cls, plan: Plan, rows: list, query: torch.Tensor, kv_cache: torch.Tensor) -> "DecodeStep":
        tokens = torch.tensor([t for _, _, t, _ in rows])
        step = cls(rows, tokens, torch.stack([d.q_cap for *_, d in rows]), torch.equal(tokens, torch.arange(len(rows))))
        if plan.window_op:
            shape = plan.shape
            H, Hkv, D = query.shape[1], kv_cache.shape[1], kv_cache.shape[-1] // 2
            cfg, B = shape.cfg, shape.block_size
            if cfg.distance_cap == cfg.local_tokens and far_kernel.usable(kv_cache.dtype):
                # every key past a row's window is at distance C: read from the store by far_kernel
                g, k = global_blocks(cfg.global_tokens, B), cfg.topk_blocks
                step.far_blocks = torch.stack([d.far_blocks for *_, d in rows])
                step.far_counts = torch.tensor([[B] * g + [d.start] + [B] * min(k, d.fa - g) + [0] * max(0, k - d.fa + g)
                                                for *_, d in rows])  # fmt: skip
                step.segments = torch.nn.utils.rnn.pad_sequence([d.window_segments for *_, d in rows], batch_first=True)
                step.splits = far_kernel.splits_for(len(rows), torch.get_num_threads())
                return step
            step.windows = torch.stack([d.window_tokens for *_, d in rows]).to(torch.int32)
            step.window_call = ops.ListedCall(len(rows), step.windows.shape[1], H, Hkv, D, query.dtype)
        return step


def _decode(plan: Plan, layer: LayerMath, rows: list, query, kv_cache, output) -> None:
    """Decode rows the short way; every row's selection in one ranking. With vLLM's op (ops.py),
    one call for every row's window, joined by log-sum-exps with the other keys: where every key
    past the window is seen at distance C, far_kernel reads those (_decode_far_kernel); else (or
    where it cannot be built) PyTorch does, row by row. Without the op, the PyTorch math."""
    cfg, B = plan.shape.cfg, plan.shape.block_size
    layer_key = _layer_key(layer, kv_cache)
    rot = angles.key(layer.rotary)
    step = plan.steps.get(rot)
    if step is None:
        step = plan.steps[rot] = DecodeStep.make(plan, rows, query, kv_cache)
    qs = query[: len(rows)] if step.lead else query[step.tokens]
    qf = qs.float()
    q_caps = torch.matmul(qf, step.q_cap)  # [R, H, D]: each query rotated to C
    far_outs, far_lses = [], []
    g = global_blocks(cfg.global_tokens, B)
    picks = select_decode_rows(plan.store, [(rid, dec.fa, dec.i) for _, rid, _, dec in rows], layer_key, q_caps, g,
                               cfg, layer.scale)  # fmt: skip
    if step.far_counts is not None:
        _decode_far_kernel(plan, step, layer, rows, picks, qs, q_caps, kv_cache, output)
        return
    for (r, rid, t, dec), q, q_cap, chosen in zip(rows, qf, q_caps, picks):
        plan.chosen[(layer_key, r)] = chosen
        blocks = torch.cat((dec.far_blocks, chosen), dim=1)
        far = plan.store.gather_far(rid, layer_key, blocks)
        if plan.window_op:
            o_f, lse_f = far_part(far_scores(q, q_cap, dec, far, blocks, cfg, B, layer.rotary)[None], far[1][None],
                                  layer.scale)  # fmt: skip
            far_outs.append(o_f[0])
            far_lses.append(lse_f[0])
        else:
            output[t] = attend_decode(q, q_cap, dec, kv_cache, far, blocks, cfg, layer.scale,
                                      layer.rotary).to(output.dtype)  # fmt: skip
    if plan.window_op:
        o_w, lse_w = step.window_call(qs, *token_views(kv_cache), step.windows, layer.scale)  # [R, H, Dv], [R, H]
        out = merge_two(o_w, lse_w, torch.stack(far_outs), torch.stack(far_lses))
        output[step.tokens] = out.to(output.dtype)


def _decode_far_kernel(plan: Plan, step: DecodeStep, layer: LayerMath, rows: list, picks: list, qs, q_caps, kv_cache,
                       output) -> None:  # fmt: skip
    """Decode rows whose keys past the window all sit at distance C, where far_kernel serves: one
    pass of far_kernel over every row's window in the pool (its keys as stored, the query as it is)
    and its other keys in the store (at position 0, the query rotated to C), in one softmax."""
    cfg, layer_key = plan.shape.cfg, _layer_key(layer, kv_cache)
    R, Hkv, k = len(rows), kv_cache.shape[1], cfg.topk_blocks
    for (r, _, _, _), c in zip(rows, picks):
        plan.chosen[(layer_key, r)] = c
    if all(c.shape[1] == k for c in picks):
        chosen = torch.stack(picks)
    else:  # (a row with fewer picks reads none of the rest: counts 0)
        chosen = torch.zeros(R, Hkv, k, dtype=torch.long)
        for j, c in enumerate(picks):
            chosen[j, :, : c.shape[1]] = c
    requests = [rid for _, rid, _, _ in rows]
    bases = plan.store.memo("chunks", layer_key, [(rid, 0) for rid in requests], lambda: far_kernel.base_table(
        [plan.store.chunk_addresses(rid, layer_key) for rid in requests]))  # fmt: skip
    D = kv_cache.shape[-1] // 2
    out, _ = far_kernel.attend(bases, torch.cat((step.far_blocks, chosen), dim=2), step.far_counts,
                               q_caps.view(R, Hkv, -1, D), chunk_blocks(plan.shape.block_size), plan.shape.block_size,
                               D, kv_cache.dtype, layer.scale, (kv_cache, step.segments, qs.reshape(R, Hkv, -1, D)),
                               step.splits)  # fmt: skip
    output[step.tokens] = out.to(output.dtype)


def _layer_key(layer: LayerMath, kv_cache: torch.Tensor):
    """The store's key of a layer: vLLM's layer name (its cache's address where a caller made
    LayerMath without one)."""
    return layer.name if layer.name is not None else kv_cache.data_ptr()


def _store_completed(store: HostStore, rid: str, layer_key, kv_cache, row, s: int, e: int, B: int,
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
    store.put(rid, layer_key, b0, at_zero, values, lo, hi)
