"""How each query row sees its keys: the one routing rule every path uses.

Plain arithmetic on (i, G, W, C), no torch, no vLLM. A query at position i sees
keys j < G (global) and i - j < W (window); a global key outside the window is
shown the distance min(i - j, C) (SPEC.md). Along the positions of a sequence
that gives runs of rows that look alike to a kernel:

    ALL_KEYS           i < W + G and i <= C (G = 0: i < W): every key 0..i is
                       visible at its true distance: plain causal attention
    GLOBALS_IN_WINDOW  C < i < W + G - 1: some globals are still inside the
                       window, the others outside it and maybe capped
    TRUE_DISTANCE      i >= W + G, i <= C: every global outside the window, none
                       capped
    SOME_CAPPED        every global outside the window, some capped, some not
                       (C < i < C + G - 1)
    CAPPED             i >= W + G - 1 and i >= C + G - 1: every global is shown
                       the distance C (at i - j = C capping changes nothing)
    NO_GLOBALS         G = 0, i >= W: a plain sliding window

Each path decides which kinds it serves itself; the boundaries live only here.
"""

import bisect
import functools
from enum import Enum

from lminf_vllm.config import LminfConfig


class Rows(str, Enum):
    ALL_KEYS = "all_keys"
    GLOBALS_IN_WINDOW = "globals_in_window"
    TRUE_DISTANCE = "true_distance"
    SOME_CAPPED = "some_capped"
    CAPPED = "capped"
    NO_GLOBALS = "no_globals"


@functools.lru_cache(maxsize=None)
def _boundaries(cfg: LminfConfig) -> list[tuple[int, Rows]]:
    """(first position, kind) in increasing order; a kind runs until the next start."""
    G, W, C = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    if G == 0:
        return [(0, Rows.ALL_KEYS), (W, Rows.NO_GLOBALS)]
    outside = W + G - 1  # from here on every global lies outside the window (i - j >= W for j < G)
    starts = [
        (0, Rows.ALL_KEYS),
        (min(W + G, C + 1), Rows.GLOBALS_IN_WINDOW),  # at W + G - 1 the last global just left: still all keys
        (outside, Rows.TRUE_DISTANCE),
        (C + 1, Rows.SOME_CAPPED),
        (C + G - 1, Rows.CAPPED),
    ]
    bounds, lo = [], 0
    for start, kind in starts:  # a kind that would start before an earlier one ends is empty
        lo = max(lo, start)
        bounds.append((lo, kind))
    return bounds


def row_runs(first: int, stop: int, cfg: LminfConfig) -> list[tuple[int, int, Rows]]:
    """Query positions [first, stop) split into runs (a, b, kind), in order."""
    bounds = _boundaries(cfg)
    runs: list[tuple[int, int, Rows]] = []
    for n, (lo, kind) in enumerate(bounds):
        hi = bounds[n + 1][0] if n + 1 < len(bounds) else stop
        a, b = max(lo, first), min(hi, stop)
        if a >= b:
            continue
        if runs and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], b, kind)
        else:
            runs.append((a, b, kind))
    return runs


@functools.lru_cache(maxsize=None)
def _starts(cfg: LminfConfig) -> tuple[list[int], list[Rows]]:
    bounds = _boundaries(cfg)
    return [lo for lo, _ in bounds], [kind for _, kind in bounds]


def row_kind(i: int, cfg: LminfConfig) -> Rows:
    """The kind of the row at position i: that of the last run starting at or before i
    (an empty run starts where the next one does). Called per decode row each step:
    a bisection over the cached boundaries, where row_runs(i, i + 1) built lists."""
    starts, kinds = _starts(cfg)
    return kinds[bisect.bisect_right(starts, i) - 1]


def is_plain(seq_len: int, cfg: LminfConfig) -> bool:
    """Is every row of a sequence of seq_len tokens plain causal attention?"""
    return seq_len <= 1 or seq_len - 1 < plain_stop(cfg)


def plain_stop(cfg: LminfConfig) -> int:
    """The first position whose row is not plain (rows 0 .. plain_stop - 1 are ALL_KEYS):
    is_plain(n) is n <= 1 or n <= plain_stop, for arrays of lengths too."""
    return _starts(cfg)[0][1]
