"""Prefill chunks past the window through vLLM's CPU kernel, on a scratch cache.

vLLM's CPU kernel (`cpu_attention_with_kv_cache`) reads keys about 2.5 times
faster than PyTorch's CPU flash attention, but it returns no log-sum-exp, so
the global branch cannot be merged into its output afterwards: the globals
must be keys of the same softmax. Two things stand in the way, and a scratch
cache built per chunk removes both:

* Where the globals go. A query at i sees keys [i - W + 1, i] plus the G
  globals. For a piece of at most W queries [a, b) the virtual sequence

      [real keys a - W + 1 .. a - 1] + [G globals] + [real keys a .. b - 1]

  with the kernel's sliding window of W + G gives every query of the piece
  exactly its window and the G globals (the globals sit inside every window
  of the piece because each one reaches back before a). Past the cap one
  virtual key stands for the G globals (next point): G = 1 here.
* Their capped distance. Past the cap the score of a global key j is
  <R(C - i) q_i, R(-j) k_j>: a second rotation of the *query*, which differs
  from the one the window keys need. So the global branch is computed apart
  (G keys per query: cheap) and enters the kernel's softmax as one virtual
  key per piece, whose score each query carries in an extra channel:
  queries [q_i, λ_i], window keys [k, 0] with values [v, 0], the virtual key
  [0, 1] with value [0, 1], λ_i = LSE_i(global scores) / scale. The kernel
  then returns [U / Z, m]: the window's weighted values and the virtual key's
  weight m, over Z = Z_window + e^(scale λ_i). With r = e^(scale λ_i) / Z_global
  (1 up to λ's rounding to the cache dtype), the exact Λ output is
  (U / Z + (m / r) o_global) / (1 - m + m / r). One channel more makes the
  head size the kernel's next one (64 -> 80), where doubling it for the
  second rotation, as this path did before, doubled the kernel's work.

By row kind (routing.py): TRUE_DISTANCE rows take the globals unrotated and
the head size as it is; CAPPED rows the virtual key and one channel more;
ALL_KEYS rows plain causal attention over the real keys; NO_GLOBALS rows a
plain sliding window. GLOBALS_IN_WINDOW and SOME_CAPPED rows (fewer than G
each per sequence), and CAPPED rows of head sizes with no larger kernel size
(512), take the PyTorch math (lambda_attention.paged_lambda_attention).

Every prefill chunk of a step is served together: the pieces of all its
requests, grouped by row kind, go into one scratch cache and one kernel call
per kind and layer (at most QUERIES_PER_CALL queries a call, so about 2 x 16k
scratch rows), and the global branch of all capped rows is one batched
softmax. Where each scratch row comes from, the call's virtual sequences and
the kernel's work split are worked out once per step (`plan_prefills`) and
serve every layer; per layer only the rows are read, written into the scratch
cache (by the kernel's own `cpu_attn_reshape_and_cache`) and attended. With
vLLM's per-step prefill cap (256 tokens a request on CPU, vllm_config.py) a
step at saturation holds many short chunks: one call for all of them instead
of one per chunk and layer is what makes prefill past the window cheap.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.cpu_attention_kernel import (
    attend,
    isa_for_head_size,
    kernel_cache_views,
    kernel_head_sizes,
    scheduler_metadata,
    write_kv_kernel,
)
from lminf_vllm.kv_layout import read_rows
from lminf_vllm.lambda_attention import paged_lambda_attention
from lminf_vllm.rope import RotarySpec, cos_sin, rotate
from lminf_vllm.routing import Rows, row_runs

# Queries per kernel call (whole pieces of at most W queries): bounds the
# scratch cache when a step holds very long chunks (no chunked prefill).
QUERIES_PER_CALL = 16384

# The row kinds this module hands to the kernel; the rest take the PyTorch math.
KERNEL_ROWS = (Rows.ALL_KEYS, Rows.NO_GLOBALS, Rows.TRUE_DISTANCE, Rows.CAPPED)


def kernel_isa(kind: Rows, dtype: torch.dtype, block_size: int, head_size: int) -> str | None:
    """The kernel ISA serving rows of this kind, or None: the PyTorch math."""
    if kind not in KERNEL_ROWS:
        return None
    return isa_for_head_size(dtype, block_size, scratch_head_size(kind, head_size))


def scratch_head_size(kind: Rows, head_size: int) -> int:
    """The scratch cache's head size: one channel more past the cap (the virtual
    key's score and weight), rounded up to a size the kernel has."""
    if kind is not Rows.CAPPED:
        return head_size
    return min((d for d in kernel_head_sizes() if d > head_size), default=0)


@dataclass
class _Piece:
    """Queries at positions [a, b) of request r, at rows [t, t + b - a) of the step's queries."""

    r: int
    a: int
    b: int
    t: int


@dataclass
class KernelCall:
    """One kernel call over the scratch cache: pieces of one row kind, of any requests."""

    kind: Rows
    isa: str
    head_size: int  # the scratch's (Dx)
    query_rows: torch.Tensor  # [Tq] the queries' rows in the step
    source: tuple[torch.Tensor, torch.Tensor]  # (cache blocks, slots) [N] of each scratch row
    virtual: torch.Tensor  # scratch rows holding the virtual key (capped calls; else empty)
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor  # [pieces, width] scratch blocks
    window: int
    metadata: object
    # Capped calls, for the global branch: each query's position, and each request's run of them
    positions: torch.Tensor | None = None
    segments: list[tuple[int, int]] = field(default_factory=list)  # [t0, t1) of the call's queries per request
    global_blocks: torch.Tensor | None = None  # [R, G] cache block of each request's global keys
    global_slots: torch.Tensor | None = None  # [G]
    _angles: dict = field(default_factory=dict)  # rotary -> the capped rotations' cos/sin (a step's layers share them)


@dataclass
class PrefillPlan:
    calls: list[KernelCall]
    torch_runs: list[tuple[int, int, int, int]]  # (request, first row, stop row, seq_len) for the PyTorch math


def plan_prefills(chunks, block_table: torch.Tensor, cfg: LminfConfig, B: int, num_heads: int, num_kv_heads: int,
                  head_size: int, dtype: torch.dtype) -> PrefillPlan:  # fmt: skip
    """chunks: (request, first row, stop row, seq_len) of the step's multi-token chunks."""
    groups: dict[Rows, list[_Piece]] = {}
    torch_runs = []
    W = cfg.local_tokens
    for r, first, stop, seq_len in chunks:
        start = seq_len - (stop - first)
        for a, b, kind in row_runs(start, seq_len, cfg):
            t = first + a - start
            if kernel_isa(kind, dtype, B, head_size) is None:
                torch_runs.append((r, t, t + b - a, b))
            elif kind is Rows.ALL_KEYS:
                groups.setdefault(kind, []).append(_Piece(r, a, b, t))
            else:  # pieces of at most W queries (module docstring)
                groups.setdefault(kind, []).extend(_Piece(r, x, min(x + W, b), t + x - a) for x in range(a, b, W))
    calls = []
    per_call = max(1, QUERIES_PER_CALL // W) * W
    for kind, pieces in groups.items():
        part, count = [], 0
        for p in pieces:
            if part and count + p.b - p.a > per_call:
                calls.append(_plan_call(kind, part, block_table, cfg, B, num_heads, num_kv_heads, head_size, dtype))
                part, count = [], 0
            part.append(p)
            count += p.b - p.a
        calls.append(_plan_call(kind, part, block_table, cfg, B, num_heads, num_kv_heads, head_size, dtype))
    return PrefillPlan(calls, torch_runs)


def _plan_call(kind, pieces, block_table, cfg, B, H, Hkv, D, dtype) -> KernelCall:
    W, capped = cfg.local_tokens, kind is Rows.CAPPED
    G = cfg.global_tokens if kind is Rows.TRUE_DISTANCE else 1 if capped else 0
    Dx = scratch_head_size(kind, D)
    isa = isa_for_head_size(dtype, B, Dx)
    requests, positions, virtual, lens, starts = [], [], [], [], [0]
    for p in pieces:
        lo = 0 if kind is Rows.ALL_KEYS else max(0, p.a - W + 1)  # the piece's oldest key
        n = (p.a - lo) + G + (p.b - p.a)
        pad = -(-n // B) * B - n
        # Past the cap the virtual key's row is filled in later (any real row stands in); padding rows
        # (past the sequence's length, never read) repeat a real one.
        globals_ = np.arange(G) if kind is Rows.TRUE_DISTANCE else np.full(G, lo)
        positions.append(np.concatenate((np.arange(lo, p.a), globals_, np.arange(p.a, p.b), np.full(pad, lo))))
        requests.append(np.full(n + pad, p.r))
        if capped:
            virtual.append(starts[-1] + p.a - lo)
        lens.append(n)
        starts.append(starts[-1] + n + pad)
    pos, req = torch.from_numpy(np.concatenate(positions)), torch.from_numpy(np.concatenate(requests))
    blocks = block_table[req, pos // B].long()
    width = max(b - a for a, b in zip(starts, starts[1:])) // B
    table = torch.zeros(len(pieces), width, dtype=torch.int32)
    for n, (a, b) in enumerate(zip(starts, starts[1:])):
        table[n, : (b - a) // B] = torch.arange(a // B, b // B, dtype=torch.int32)
    qsl = torch.tensor(np.cumsum([0] + [p.b - p.a for p in pieces]), dtype=torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32)
    window = -1 if kind is Rows.ALL_KEYS else W + G
    rows = torch.from_numpy(np.concatenate([np.arange(p.t, p.t + p.b - p.a) for p in pieces]))
    call = KernelCall(kind, isa, Dx, rows, (blocks, pos % B), torch.tensor(virtual, dtype=torch.long), qsl, seq,
                      table, window, scheduler_metadata(qsl, seq, window, isa, H, Hkv, Dx, dtype))  # fmt: skip
    if capped:
        reqs, t = [], 0  # a request's pieces are consecutive (one run of a kind per step)
        for p in pieces:
            if not reqs or reqs[-1] != p.r:
                reqs.append(p.r)
                call.segments.append((t, t))
            t += p.b - p.a
            call.segments[-1] = (call.segments[-1][0], t)
        call.positions = torch.from_numpy(np.concatenate([np.arange(p.a, p.b) for p in pieces]))
        glob = torch.arange(cfg.global_tokens)
        call.global_blocks = block_table[torch.tensor(reqs)][:, glob // B].long()
        call.global_slots = glob % B
    return call


def run_prefills(plan: PrefillPlan, query, kv_cache, block_table, cfg: LminfConfig, scale: float,
                 rotary: RotarySpec, layout: str, output: torch.Tensor) -> None:  # fmt: skip
    """One layer's attention for the step's prefill chunks, into output's rows."""
    for call in plan.calls:
        output[call.query_rows] = _run_call(call, query, kv_cache, cfg, scale, rotary, layout).to(output.dtype)
    for r, t0, t1, seq_len in plan.torch_runs:
        out = paged_lambda_attention(query[t0:t1], kv_cache, block_table[r], seq_len, cfg, scale, rotary, None, layout)
        output[t0:t1] = out.to(output.dtype)


def _run_call(call: KernelCall, query, kv_cache, cfg, scale, rotary, layout) -> torch.Tensor:
    """-> [Tq, H, D] float32, the Λ output of the call's queries."""
    D, B, Dx = query.shape[-1], kv_cache.shape[2], call.head_size
    keys, values = read_rows(kv_cache, *call.source, D, layout)  # [N, Hkv, D]
    q = query[call.query_rows]
    capped = call.kind is Rows.CAPPED
    if capped:  # [k, 0] / [v, 0], the virtual key and value [0, 1] (module docstring)
        keys, values = (torch.nn.functional.pad(x, (0, Dx - D)) for x in (keys, values))
        keys[call.virtual], values[call.virtual] = 0, 0
        keys[call.virtual, :, D], values[call.virtual, :, D] = 1, 1
        glob = _global_branch(call, q, kv_cache, cfg, scale, rotary, layout)
        q = torch.cat((q, glob.lam[..., None], q.new_zeros(*q.shape[:2], Dx - D - 1)), dim=-1)
    scratch = kv_cache.new_empty(keys.shape[0] // B, keys.shape[1], B, 2 * Dx)
    write_kv_kernel(scratch, keys, values, torch.arange(keys.shape[0]), call.isa)
    out = torch.empty_like(q)
    attend(q.contiguous(), *kernel_cache_views(scratch), out, call.query_start_loc, call.seq_lens, call.block_table,
           call.window, call.metadata, scale)  # fmt: skip
    if not capped:
        return out[..., :D].float()
    return glob.merge(out[..., :D].float(), out[..., D].float())


def prefill_attention(q, kv_cache, block_row, seq_len: int, cfg: LminfConfig, scale: float, rotary: RotarySpec,
                      layout: str) -> torch.Tensor:  # fmt: skip
    """One request's chunk q [T, H, D] (its last query at seq_len - 1) -> [T, H, D] float32
    (benchmarks/cpu_prefill.py; the engine plans a step's chunks together)."""
    T, H, D = q.shape
    table = block_row[None]
    plan = plan_prefills([(0, 0, T, seq_len)], table, cfg, kv_cache.shape[2], H, kv_cache.shape[1], D, kv_cache.dtype)
    out = torch.empty(T, H, D)
    run_prefills(plan, q, kv_cache, table, cfg, scale, rotary, layout, out)
    return out


class _GlobalBranch:
    """The global branch of queries past the cap, and how it merges with the kernel's output."""

    def __init__(self, lse: torch.Tensor, out: torch.Tensor, lam: torch.Tensor, scale: float):
        self.out, self.lam = out, lam  # [T, H, D] float32; [T, H] in the cache dtype
        self.r = torch.exp(lam.float() * scale - lse)  # e^(score the kernel sees) / Z_global

    def merge(self, window: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """window = U / Z, m = the virtual key's weight (module docstring) -> the Λ output."""
        mg = (m / self.r)[..., None]
        return (window + mg * self.out) / (1 - m[..., None] + mg)


def _global_branch(call: KernelCall, q, kv_cache, cfg, scale, rotary, layout) -> _GlobalBranch:
    """Softmax of the call's queries over their requests' G global keys at the capped distance C:
    scores <R(C - i) q_i, R(-j) k_j> (rotations compose). A request's queries are one run of the
    call's (call.segments), scored against its own G keys."""
    T, H, D = q.shape
    R, G = call.global_blocks.shape
    k, v = read_rows(kv_cache, call.global_blocks.flatten(), call.global_slots.repeat(R), D, layout)  # [R G, Hkv, D]
    Hkv = k.shape[1]
    angles = call._angles.get(id(rotary))
    if angles is None:  # (rotary objects live as long as the engine; the plan one step)
        cq, sq = cos_sin(cfg.distance_cap - call.positions, rotary.inv_freq, torch.float32)
        ck, sk = cos_sin(-torch.arange(G).repeat(R), rotary.inv_freq, torch.float32)
        angles = call._angles[id(rotary)] = (cq[:, None], sq[:, None], ck[:, None], sk[:, None])
    cq, sq, ck, sk = angles
    q_cap = rotate(q.float(), cq, sq, rotary).view(T, Hkv, H // Hkv, D)
    k_cap = rotate(k.float(), ck, sk, rotary).view(R, G, Hkv, D).permute(0, 2, 3, 1)  # [R, Hkv, D, G]
    v = v.float().view(R, G, Hkv, D).transpose(1, 2)  # [R, Hkv, G, D]
    scores = q_cap.new_empty(T, Hkv, H // Hkv, G)
    for n, (t0, t1) in enumerate(call.segments):
        torch.matmul(q_cap[t0:t1], k_cap[n], out=scores[t0:t1])
    scores *= scale
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.softmax(scores, dim=-1)
    out = torch.empty_like(q_cap)
    for n, (t0, t1) in enumerate(call.segments):
        torch.matmul(weights[t0:t1], v[n], out=out[t0:t1])
    lam = (lse / scale).to(q.dtype)
    return _GlobalBranch(lse.view(T, H), out.view(T, H, D), lam.view(T, H), scale)
