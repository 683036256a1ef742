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

The scratch cache lives for one kernel call: (W + G + piece) rows per piece,
pieces of at most QUERIES_PER_CALL queries per call (about 2 x 16k rows), in
the kernel's own layout (written by its own `cpu_attn_reshape_and_cache`).
"""

import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.kv_layout import gather_kv
from lminf_vllm.lambda_attention import capped_rotations, paged_lambda_attention
from lminf_vllm.paths.cpu_kernel.ops import (
    attend,
    isa_for_head_size,
    kernel_head_sizes,
    kernel_cache_views,
    scheduler_metadata,
    write_kv_kernel,
)
from lminf_vllm.rope import RotarySpec
from lminf_vllm.routing import Rows, row_runs

# Queries per kernel call (rounded to whole pieces of W): bounds the scratch
# cache when a prefill step is very long (no chunked prefill).
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


def prefill_attention(
    q: torch.Tensor,  # [T, H, D] one request's queries, rotated at true positions
    kv_cache: torch.Tensor,  # in kv_layout.CPU_KERNEL_LAYOUT
    block_row: torch.Tensor,
    seq_len: int,  # the last query is at seq_len - 1
    cfg: LminfConfig,
    scale: float,
    rotary: RotarySpec,
    layout: str,
) -> torch.Tensor:
    """paged_lambda_attention for a multi-token step, through the kernel where it can. -> [T, H, D] float32."""
    T, H, D = q.shape
    first = seq_len - T
    out = torch.empty(T, H, D)
    for a, b, mode in row_runs(first, seq_len, cfg):
        rows = slice(a - first, b - first)
        isa = kernel_isa(mode, kv_cache.dtype, kv_cache.shape[2], D)
        if isa is None:
            out[rows] = paged_lambda_attention(q[rows], kv_cache, block_row, b, cfg, scale, rotary, None, layout)
            continue
        # Bounded scratch for very long chunks: several calls of whole pieces each.
        step = max(1, QUERIES_PER_CALL // cfg.local_tokens) * cfg.local_tokens
        for a1 in range(a, b, step):
            b1 = min(a1 + step, b)
            rows = slice(a1 - first, b1 - first)
            out[rows] = _kernel_run(q[rows], kv_cache, block_row, a1, b1, cfg, scale, rotary, layout, mode, isa)
    return out


def _kernel_run(q, kv_cache, block_row, a0, b0, cfg, scale, rotary, layout, mode, isa):
    """Queries at [a0, b0), all of one mode, in one kernel call over a scratch cache."""
    T, H, D = q.shape
    W, B = cfg.local_tokens, kv_cache.shape[2]
    capped = mode is Rows.CAPPED
    G = cfg.global_tokens if mode is Rows.TRUE_DISTANCE else 1 if capped else 0  # keys inserted per piece
    Dx = scratch_head_size(mode, D)
    reach = (lambda a: 0) if mode is Rows.ALL_KEYS else (lambda a: max(0, a - W + 1))  # a query's oldest key
    lo_all = reach(a0)
    k_loc, v_loc = gather_kv(kv_cache, block_row, lo_all, b0, D, layout)  # [L, Hkv, D]
    Hkv = k_loc.shape[1]
    if capped:
        k_glob, v_glob = _virtual_key(Hkv, D, Dx, k_loc.dtype)
        glob = _global_branch(q, a0, kv_cache, block_row, cfg, scale, rotary, layout)
        q = torch.cat((q, glob.lam[..., None], q.new_zeros(T, H, Dx - D - 1)), dim=-1)
    else:
        k_glob, v_glob = gather_kv(kv_cache, block_row, 0, G, D, layout)

    # Pieces of at most W queries (module docstring); each a virtual request padded to whole blocks.
    pieces = [(a0, b0)] if mode is Rows.ALL_KEYS else [(a, min(a + W, b0)) for a in range(a0, b0, W)]
    lens = [(a - reach(a)) + G + (b - a) for a, b in pieces]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + -(-n // B) * B)
    keys = k_loc.new_zeros(starts[-1], Hkv, Dx)
    values = v_loc.new_zeros(starts[-1], Hkv, Dx)
    glob_cols = slice(0, Dx) if capped else slice(0, D)
    for (a, b), s in zip(pieces, starts):
        lo = reach(a)
        before, after = slice(lo - lo_all, a - lo_all), slice(a - lo_all, b - lo_all)
        g0, g1 = s + a - lo, s + a - lo + G
        keys[s:g0, :, :D], values[s:g0, :, :D] = k_loc[before], v_loc[before]
        keys[g0:g1, :, glob_cols] = k_glob
        values[g0:g1, :, glob_cols] = v_glob
        keys[g1 : g1 + b - a, :, :D], values[g1 : g1 + b - a, :, :D] = k_loc[after], v_loc[after]
    scratch = kv_cache.new_empty(starts[-1] // B, Hkv, B, 2 * Dx)
    write_kv_kernel(scratch, keys, values, torch.arange(starts[-1]), isa)
    kc, vc = kernel_cache_views(scratch)

    width = max(starts[n + 1] - starts[n] for n in range(len(pieces))) // B
    table = torch.zeros(len(pieces), width, dtype=torch.int32)
    for n in range(len(pieces)):
        blocks = torch.arange(starts[n] // B, starts[n + 1] // B, dtype=torch.int32)
        table[n, : len(blocks)] = blocks
    qsl = torch.tensor([0] + [b - a0 for _, b in pieces], dtype=torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32)
    window = -1 if mode is Rows.ALL_KEYS else W + G
    meta = scheduler_metadata(qsl, seq, window, isa, H, Hkv, Dx, q.dtype)
    q = q.contiguous()
    out = torch.empty_like(q)
    attend(q, kc, vc, out, qsl, seq, table, window, meta, scale)
    if not capped:
        return out[..., :D].float()
    return glob.merge(out[..., :D].float(), out[..., D].float())


def _virtual_key(Hkv: int, D: int, Dx: int, dtype):
    """The key and value standing for the globals past the cap: channel D set."""
    key = torch.zeros(1, Hkv, Dx, dtype=dtype)
    key[..., D] = 1
    return key, key.clone()


class _GlobalBranch:
    """The global branch of queries past the cap, and how it merges with the kernel's output."""

    def __init__(self, lse: torch.Tensor, out: torch.Tensor, lam: torch.Tensor, scale: float):
        self.out, self.lam = out, lam  # [T, H, D] float32; [T, H] in the cache dtype
        self.r = torch.exp(lam.float() * scale - lse)  # e^(score the kernel sees) / Z_global

    def merge(self, window: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """window = U / Z, m = the virtual key's weight (module docstring) -> the Λ output."""
        mg = (m / self.r)[..., None]
        return (window + mg * self.out) / (1 - m[..., None] + mg)


def _global_branch(q, a0, kv_cache, block_row, cfg, scale, rotary, layout) -> _GlobalBranch:
    """Softmax of queries at a0.. over the G global keys at the capped distance C."""
    T, H, D = q.shape
    k_glob, v_glob = gather_kv(kv_cache, block_row, 0, cfg.global_tokens, D, layout)
    Hkv = k_glob.shape[1]
    q_cap, k_cap = capped_rotations(q, a0, k_glob, cfg.distance_cap, rotary)
    q_cap = q_cap.view(T, Hkv, H // Hkv, D)
    scores = torch.einsum("thgd,jhd->thgj", q_cap, k_cap) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("thgj,jhd->thgd", torch.softmax(scores, dim=-1), v_glob.float())
    lam = (lse / scale).to(q.dtype)
    return _GlobalBranch(lse.view(T, H), out.reshape(T, H, D), lam.view(T, H), scale)
