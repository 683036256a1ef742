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
  of the piece because each one reaches back before a).
* Their capped distance. Past the cap the score of a global key j is
  <R(C - i) q_i, R(-j) k_j>: a second rotation of the *query*, which differs
  from the one the window keys need. The head size is doubled instead: the
  queries become [q_i, R(C - i) q_i], window keys [k, 0], global keys
  [0, R(-j) k_j], values [v, 0]. Every dot product is then the one Λ-attention
  asks for, at twice the arithmetic, which still beats the PyTorch path
  (benchmarks/cpu_prefill.py measures both).

Rows whose globals are all at most C away take the globals unrotated and the
head size as it is. Rows before W + G - 1 (some global inside the window) and
at most C see every earlier key at its true distance: plain causal attention
over the real keys. Rows where only some globals are capped (C < i < C + G - 1),
the rest of the rows before W + G - 1, and head sizes the kernel lacks take the
PyTorch path (lambda_attention.paged_lambda_attention).

The scratch cache lives for one kernel call: (W + G + piece) rows per piece,
pieces of at most QUERIES_PER_CALL queries per call (about 2 x 16k rows), in
the kernel's own layout (written by its own `cpu_attn_reshape_and_cache`).
"""

import functools

import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.cpu_kernel_path import attend, kernel_cache_views, scheduler_metadata, write_kv_kernel
from lminf_vllm.lambda_attention import capped_rotations, gather_kv, paged_lambda_attention
from lminf_vllm.rope import RotarySpec

# Queries per kernel call (rounded to whole pieces of W): bounds the scratch
# cache when a prefill step is very long (no chunked prefill).
QUERIES_PER_CALL = 16384

# How the globals of a run of rows are presented to the kernel.
ALL_KEYS = "all_keys"  # i < W + G - 1 and i <= C: every key 0..i at its true distance, plain causal
NO_GLOBALS = "no_globals"  # G = 0: a plain sliding window
TRUE_DISTANCE = "true_distance"  # every global at most C away: stored keys as they are
CAPPED = "capped"  # every global at least C away: doubled head size (module docstring)


def row_runs(first: int, stop: int, cfg: LminfConfig) -> list[tuple[int, int, str | None]]:
    """Split query positions [first, stop) into runs (a, b, mode); mode None = the PyTorch path."""
    G, W, C = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    if G == 0:
        bounds = [(0, NO_GLOBALS)]
    else:
        # From W + G - 1 on every global lies outside the window (i - j >= W for j < G).
        start = W + G - 1
        capped_from = max(start, C + G - 1, C + 1)
        bounds = [(0, ALL_KEYS), (min(start, C + 1), None), (start, TRUE_DISTANCE), (max(start, C + 1), None),
                  (capped_from, CAPPED)]  # fmt: skip
    runs = []
    for n, (lo, mode) in enumerate(bounds):
        hi = bounds[n + 1][0] if n + 1 < len(bounds) else stop
        a, b = max(lo, first), min(hi, stop)
        if a < b:
            if runs and runs[-1][2] == mode:
                runs[-1] = (runs[-1][0], b, mode)
            else:
                runs.append((a, b, mode))
    return runs


@functools.lru_cache(maxsize=None)
def kernel_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str | None:
    """The kernel's ISA for scratch caches of this head size, or None if it has no such head size."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa

    if head_size not in CPUAttentionBackend.get_supported_head_sizes():
        return None
    return _get_attn_isa(dtype, block_size, head_size)


def prefill_attention(
    q: torch.Tensor,  # [T, H, D] one request's queries, rotated at true positions
    kv_cache: torch.Tensor,  # in lambda_attention.CPU_KERNEL_LAYOUT
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
        isa = None if mode is None else kernel_isa(kv_cache.dtype, kv_cache.shape[2], 2 * D if mode == CAPPED else D)
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
    G = cfg.global_tokens if mode in (TRUE_DISTANCE, CAPPED) else 0  # globals inserted
    wide = mode == CAPPED
    Dx = 2 * D if wide else D
    reach = (lambda a: 0) if mode == ALL_KEYS else (lambda a: max(0, a - W + 1))  # a query's oldest key
    lo_all = reach(a0)
    k_loc, v_loc = gather_kv(kv_cache, block_row, lo_all, b0, D, layout)  # [L, Hkv, D]
    k_glob, v_glob = gather_kv(kv_cache, block_row, 0, G, D, layout)
    Hkv = k_loc.shape[1]
    if wide:
        q_cap, k_cap = capped_rotations(q, a0, k_glob, cfg.distance_cap, rotary)
        q, k_glob = torch.cat((q, q_cap.to(q.dtype)), dim=-1), k_cap.to(k_glob.dtype)

    # Pieces of at most W queries (module docstring); each a virtual request padded to whole blocks.
    pieces = [(a0, b0)] if mode == ALL_KEYS else [(a, min(a + W, b0)) for a in range(a0, b0, W)]
    lens = [(a - reach(a)) + G + (b - a) for a, b in pieces]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + -(-n // B) * B)
    keys = k_loc.new_zeros(starts[-1], Hkv, Dx)
    values = v_loc.new_zeros(starts[-1], Hkv, Dx)
    glob_half = slice(D, 2 * D) if wide else slice(0, D)
    for (a, b), s in zip(pieces, starts):
        lo = reach(a)
        before, after = slice(lo - lo_all, a - lo_all), slice(a - lo_all, b - lo_all)
        g0, g1 = s + a - lo, s + a - lo + G
        keys[s:g0, :, :D], values[s:g0, :, :D] = k_loc[before], v_loc[before]
        keys[g0:g1, :, glob_half] = k_glob
        values[g0:g1, :, :D] = v_glob
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
    window = -1 if mode == ALL_KEYS else W + G
    meta = scheduler_metadata(qsl, seq, window, isa, H, Hkv, Dx, q.dtype)
    q = q.contiguous()
    out = torch.empty_like(q)
    attend(q, kc, vc, out, qsl, seq, table, window, meta, scale)
    return out[..., :D].float()
