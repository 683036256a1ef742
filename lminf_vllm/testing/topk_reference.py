"""Dense reference of docs/topk-contract.md: the Λ-mask plus the top-k middle blocks.

The oracle the top-k engine path is held to. Nothing here is shared with a fast
path: the block selection is computed from the block's explicit attention mass
(score "mass", the default: per query head, the log-sum-exp of the block's
exact scores at distance C, as a share of that head's softmax over every
candidate; score "mass_int8": the same with keys and query first rounded to 8
bits, written out here apart from the engine's sketch.py) or the explicit Quest
bound (score "bound": per channel, max(q_c * min_c, q_c * max_c), summed), and
the attention from
explicit [n, n] visibility (per KV head) and distance matrices, with queries
and keys rotated at explicit positions exactly as in reference.py. float64 by
default; no vLLM import.

`blockwise_topk_attention` is a second formulation of the same contract (two
score matmuls per row block instead of one rotation per query/key pair) so that
a 135M model can be run at a few thousand tokens on a CPU; tests hold it to
`dense_topk_attention`.

Vocabulary (the contract's): B = block size, block b holds positions
[b*B, (b+1)*B); a "chunk" is the query rows [s, e) of one sequence computed in
one engine step (a decode step is a chunk of one row); a "selection" is, per
chunk and per KV head, a sorted list of middle block indices.
"""

import functools
from collections.abc import Sequence

import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.rope import RotarySpec, cos_sin, rotate
from lminf_vllm.testing.reference import ROW_CHUNK, lambda_mask_and_distance

GROUP_REDUCE = ("max", "sum")  # how a GQA group's per-head scores make the KV head's score
CHUNK_RULES = ("last", "max")  # which rows of a chunk score: its last row, or the max over its rows
# a block's score (config.TOPK_SCORES): its attention mass (share), Quest's bound, or the mass with keys
# and query rounded to 8 bits (rounded_8bit)
SCORES = ("mass", "bound", "mass_int8")
DEFAULT_GROUP_REDUCE = "max"
DEFAULT_CHUNK_RULE = "last"
DEFAULT_SCORE = "mass"

Selection = list[tuple[int, int, list[list[int]]]]  # (s, e, blocks per KV head) per chunk


# ---------------------------------------------------------------- block arithmetic


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def global_block_count(cfg: LminfConfig, B: int) -> int:
    """Blocks [0, ceil(G/B)): those holding any global position."""
    return _cdiv(cfg.global_tokens, B)


def first_window_block(i: int, cfg: LminfConfig, B: int) -> int:
    """The block holding the oldest position the query at i sees locally, max(0, i - W + 1)."""
    return max(0, i - cfg.local_tokens + 1) // B


def middle_blocks(i: int, cfg: LminfConfig, B: int) -> range:
    """Blocks wholly after the global blocks and wholly before the query at i's first window block."""
    g = global_block_count(cfg, B)
    return range(g, max(g, first_window_block(i, cfg, B)))


def chunk_spans(n: int, chunks: int | Sequence[int] | None) -> list[tuple[int, int]]:
    """[s, e) per chunk: None = one chunk of n rows; an int = chunks of that many rows; a list = their lengths."""
    if chunks is None:
        return [(0, n)] if n else []
    if isinstance(chunks, int):
        return [(s, min(n, s + chunks)) for s in range(0, n, chunks)]
    if sum(chunks) != n or any(c < 1 for c in chunks):
        raise ValueError(f"chunk lengths {list(chunks)} must be >= 1 and sum to n = {n}")
    spans, s = [], 0
    for c in chunks:
        spans.append((s, s + c))
        s += c
    return spans


# ---------------------------------------------------------------- the Quest bound


def _rotated_at(x: torch.Tensor, position: int, rotary: RotarySpec) -> torch.Tensor:
    """x rotated to one absolute position, with the model's cos/sin table scaling (as reference.py)."""
    cos, sin = (t * rotary.attention_scaling for t in cos_sin(torch.tensor(position), rotary.inv_freq, x.dtype))
    return rotate(x, cos, sin, rotary)


def keys_at_zero(k0: torch.Tensor, rotary: RotarySpec) -> torch.Tensor:
    """Keys rotated to position 0: R(-j) applied to the key stored rotated at its own position j."""
    return _rotated_at(k0, 0, rotary)


def query_at_cap(q0: torch.Tensor, cfg: LminfConfig, rotary: RotarySpec) -> torch.Tensor:
    """Queries rotated to position C: q_C . R(0)k_j is the score of key j at distance C, for every j."""
    return _rotated_at(q0, cfg.distance_cap, rotary)


def key_summaries(k0: torch.Tensor, B: int, rotary: RotarySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per full block, KV head and channel: min and max of the keys at position 0. -> 2 x [n // B, Hkv, D]."""
    n, Hkv, D = k0.shape
    kz = keys_at_zero(k0, rotary)[: (n // B) * B].reshape(n // B, B, Hkv, D)
    return kz.amin(dim=1), kz.amax(dim=1)


def block_bounds(q_cap: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's bound per (row, query head, block): sum_c max(q_c * min_c, q_c * max_c).

    q_cap [rows, H, D] (queries at position C); kmin, kmax [nb, Hkv, D]. -> [rows, H, nb].
    A query head reads its GQA group's KV head. Unscaled (the softmax scale does not change an order).
    """
    rows, H, D = q_cap.shape
    group = H // kmin.shape[1]
    lo, hi = (t.repeat_interleave(group, dim=1) for t in (kmin, kmax))  # [nb, H, D]
    q = q_cap[:, None]  # [rows, 1, H, D]
    return torch.maximum(q * lo[None], q * hi[None]).sum(-1).permute(0, 2, 1)


def block_bounds_matmul(q_cap: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """The same bound as two matmuls, q+ . max + q- . min (equal up to summation order)."""
    rows, H, D = q_cap.shape
    Hkv = kmin.shape[1]
    q = q_cap.view(rows, Hkv, H // Hkv, D)
    out = torch.einsum("rkgd,bkd->rkgb", q.clamp(min=0), kmax) + torch.einsum("rkgd,bkd->rkgb", q.clamp(max=0), kmin)
    return out.reshape(rows, H, -1)


def rounded_8bit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (integers in [-127, 127] as x's dtype, scales [...]): x / s rounded half to even,
    s = max |x| / 127 per vector (the contract's "Mass from 8-bit keys")."""
    s = x.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(x / s[..., None]), s


def block_mass_shares(q_cap: torch.Tensor, k0: torch.Tensor, B: int, cand: range, rotary: RotarySpec,
                      scale: float, int8: bool = False) -> torch.Tensor:  # fmt: skip
    """Each candidate block's share of a query head's softmax, every candidate visible at distance C.

    q_cap [rows, H, D] (queries at position C); k0 [n, Hkv, D] not rotated; cand: the candidate
    blocks. Per (row, query head h, block b): lse_b = logsumexp over j in b of scale * q_C . u_j
    (u_j: key j at position 0, so each token's exact score at distance C), and the share
    exp(lse_b - logsumexp over the candidate blocks' lse). -> [rows, H, nb] with nb the number of
    full blocks; 0 outside cand. A query head reads its GQA group's KV head. int8 (score
    "mass_int8"): u_j and q_C rounded to 8 bits first, per key and KV head and per query head
    (rounded_8bit), the score scale * qs * ks_j * (q8 . k8_j).
    """
    rows, H, D = q_cap.shape
    n, Hkv, _ = k0.shape
    nb = n // B
    out = q_cap.new_zeros(rows, H, nb)
    if not cand:
        return out
    kz = keys_at_zero(k0, rotary)[cand.start * B : cand.stop * B]  # [nc B, Hkv, D]
    if int8:
        (k8, ks), (q8, qs) = rounded_8bit(kz), rounded_8bit(q_cap)
        dots = torch.einsum("rhd,jhd->rhj", q8, k8.repeat_interleave(H // Hkv, dim=1))
        s = dots * ks.repeat_interleave(H // Hkv, dim=1).T[None] * qs[..., None] * scale
    else:
        s = torch.einsum("rhd,jhd->rhj", q_cap, kz.repeat_interleave(H // Hkv, dim=1)) * scale
    lse = torch.logsumexp(s.view(rows, H, len(cand), B), dim=-1)  # [rows, H, nc]
    out[..., cand.start : cand.stop] = torch.exp(lse - torch.logsumexp(lse, dim=-1, keepdim=True))
    return out


# ---------------------------------------------------------------- selection


def select_blocks(
    bounds: torch.Tensor,
    s: int,
    cfg: LminfConfig,
    B: int,
    topk: int,
    n_kv: int,
    group_reduce: str = DEFAULT_GROUP_REDUCE,
    chunk_rule: str = DEFAULT_CHUNK_RULE,
) -> list[list[int]]:
    """One chunk's selection, per KV head: sorted block indices.

    bounds [e - s, H, nb]: the score (bound or mass share) of every row of the chunk [s, e) against
    every full block.
    Candidates: the middle blocks of the chunk's last row. A KV head's score of a block is the
    group's bounds reduced (max or sum) per row, then taken at the last row ("last") or maximised
    over the rows for which the block is middle ("max"). The min(k, #candidates) highest win;
    on equal scores the lower block index wins.
    """
    if group_reduce not in GROUP_REDUCE or chunk_rule not in CHUNK_RULES:
        raise ValueError(f"group_reduce {group_reduce!r} / chunk_rule {chunk_rule!r}")
    rows, H, _ = bounds.shape
    e = s + rows
    cand = middle_blocks(e - 1, cfg, B)
    if topk == 0 or not cand:
        return [[] for _ in range(n_kv)]
    per_group = bounds[:, :, cand.start : cand.stop].reshape(rows, n_kv, H // n_kv, len(cand))
    per_kv = per_group.amax(dim=2) if group_reduce == "max" else per_group.sum(dim=2)  # [rows, Hkv, cand]
    if chunk_rule == "last":
        score = per_kv[-1]
    else:
        # row i may use block b only when b is middle for it: first_window_block(i) > b
        fwb = torch.tensor([first_window_block(i, cfg, B) for i in range(s, e)])
        eligible = fwb[:, None] > torch.tensor(list(cand))[None, :]  # [rows, cand]
        score = per_kv.masked_fill(~eligible[:, None, :], float("-inf")).amax(dim=0)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :topk]  # stable: lower index first
    return [sorted(cand.start + int(o) for o in order[h]) for h in range(n_kv)]


def topk_selections(
    q0, k0, cfg: LminfConfig, rotary: RotarySpec, topk: int, B: int, chunks=None,
    group_reduce: str = DEFAULT_GROUP_REDUCE, chunk_rule: str = DEFAULT_CHUNK_RULE, bounds_fn=block_bounds,
    score: str = DEFAULT_SCORE, scale: float | None = None,
) -> Selection:  # fmt: skip
    """Every chunk's selection for one layer: q0 [n, H, D], k0 [n, Hkv, D] not rotated.

    score "mass" (the default): block_mass_shares of the chunk's candidates M(e - 1), with the
    attention's scale (None: head_size ** -0.5); "bound": Quest's (bounds_fn). Then select_blocks."""
    if score not in SCORES:
        raise ValueError(f"score {score!r}: one of {SCORES}")
    n, _, D = q0.shape
    n_kv = k0.shape[1]
    scale = D**-0.5 if scale is None else scale
    kmin, kmax = key_summaries(k0, B, rotary) if score == "bound" else (None, None)
    out = []
    kept = None  # (the row that scored it, its selection): the last selection a decode row scored
    for s, e in chunk_spans(n, chunks):
        cand = middle_blocks(e - 1, cfg, B)
        if topk == 0 or not cand:
            out.append((s, e, [[] for _ in range(n_kv)]))
            continue
        if e - s == 1 and kept is not None and kept_for(s, kept[0], len(kept[1][0]), min(topk, len(cand)), cfg):
            out.append((s, e, kept[1]))  # a decode row: the kept selection
            continue
        rows = slice(e - 1, e) if chunk_rule == "last" else slice(s, e)
        q_cap = query_at_cap(q0[rows], cfg, rotary)
        if score == "bound":
            bounds = bounds_fn(q_cap, kmin, kmax)
        else:
            bounds = block_mass_shares(q_cap, k0, B, middle_blocks(e - 1, cfg, B), rotary, scale,
                                       int8=score == "mass_int8")  # fmt: skip
        if chunk_rule == "last":  # only the last row is read: pad the others
            bounds = torch.cat((bounds.new_zeros(e - 1 - s, *bounds.shape[1:]), bounds))
        selection = select_blocks(bounds, s, cfg, B, topk, n_kv, group_reduce, chunk_rule)
        if e - s == 1:  # a decode row's, kept for the next ones (a longer chunk's serves its own rows)
            kept = (e - 1, selection)
        out.append((s, e, selection))
    return out


def kept_for(i: int, scored_at: int, size: int, need: int, cfg: LminfConfig) -> bool:
    """Does a decode row at i read the selection its request's decode row scored_at scored (size
    blocks per KV head) instead of scoring its own? While that row is fewer than topk_refresh
    positions back and the selection has all the blocks i may read, min(k, |M(i)|)."""
    return 0 < i - scored_at < cfg.topk_refresh and size >= need


# ---------------------------------------------------------------- the attention


def topk_mask_and_distance(n: int, cfg: LminfConfig, B: int, topk: int, selection: Selection, n_kv: int, device=None):
    """Per (query i, key j, KV head): visible [n, n, Hkv] bool; distance d [n, n] long.

    topk = 0: SPEC.md's Λ-mask, whatever `selection` says. topk >= 1: key j <= i is visible iff
    its block is a global block (b < ceil(G/B)), a window block of i (b >= first_window_block(i)),
    or a block selected for i's chunk. Distance: i - j inside the window (i - j < W), else
    min(i - j, C): SPEC.md's formula, for every visible pair.
    """
    lam, dist = lambda_mask_and_distance(n, cfg, device)
    if topk == 0:
        return lam[:, :, None].repeat(1, 1, n_kv), dist
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    fwb = torch.tensor([first_window_block(r, cfg, B) for r in range(n)], device=device)[:, None]
    blocks = (j < global_block_count(cfg, B) * B) | (j // B >= fwb)  # [n, n]: whole global and window blocks
    visible = blocks[:, :, None].repeat(1, 1, n_kv)
    for s, e, per_head in selection:
        for h, chosen in enumerate(per_head):
            for b in chosen:
                visible[s:e, b * B : (b + 1) * B, h] = True
    return visible & (j <= i)[:, :, None], dist


def dense_topk_attention(
    q0, k0, v, cfg: LminfConfig, rotary: RotarySpec, scale: float, *, topk: int, block_size: int, chunks=None,
    group_reduce: str = DEFAULT_GROUP_REDUCE, chunk_rule: str = DEFAULT_CHUNK_RULE, selection: Selection | None = None,
    score: str = DEFAULT_SCORE,
):  # fmt: skip
    """q0 [n, H, D], k0 [n, Hkv, D] NOT rotated; v [n, Hkv, Dv]. -> [n, H, Dv] in q0's dtype.

    `selection` (as topk_selections returns) replaces the computed one: to hold an engine's
    attention to the reference given the engine's own choice of blocks.
    """
    n, H, D = q0.shape
    n_kv = k0.shape[1]
    group = H // n_kv
    if selection is None:
        selection = topk_selections(q0, k0, cfg, rotary, topk, block_size, chunks, group_reduce, chunk_rule,
                                    score=score, scale=scale)  # fmt: skip
    visible_kv, dist = topk_mask_and_distance(n, cfg, block_size, topk, selection, n_kv, q0.device)
    visible = visible_kv.repeat_interleave(group, dim=2)  # [n, n, H]
    k0, v = k0.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    # From here on the arithmetic is dense_lambda_attention's, step for step (so k = 0 is bit-equal).
    j = torch.arange(n, device=q0.device)
    cos_t, sin_t = (t * rotary.attention_scaling for t in cos_sin(j, rotary.inv_freq, q0.dtype))
    k_rot = rotate(k0, cos_t[:, None], sin_t[:, None], rotary)  # keys at their true position j
    out = torch.empty(n, H, v.shape[-1], dtype=q0.dtype, device=q0.device)
    for a in range(0, n, ROW_CHUNK):
        b = min(n, a + ROW_CHUNK)
        cols = visible[a:b].any(dim=2).any(dim=0).nonzero().flatten()
        pos_q = (cols[None, :] + dist[a:b, cols]).clamp(min=0)  # the query's position as seen from key j
        cos_q, sin_q = cos_t[pos_q], sin_t[pos_q]
        q_rot = rotate(q0[a:b, None], cos_q[:, :, None], sin_q[:, :, None], rotary)  # [rows, cols, H, D]
        scores = (q_rot * k_rot[cols][None]).sum(-1) * scale  # [rows, cols, H]
        scores = scores.masked_fill(~visible[a:b][:, cols], float("-inf"))
        probs = torch.softmax(scores, dim=1)
        out[a:b] = torch.einsum("rjh,jhd->rhd", probs, v[cols])
    return out


def brute_force_topk_attention(
    q0, k0, v, cfg: LminfConfig, rotary: RotarySpec, scale: float, *, topk: int, block_size: int, chunks=None,
    group_reduce: str = DEFAULT_GROUP_REDUCE, chunk_rule: str = DEFAULT_CHUNK_RULE, score: str = DEFAULT_SCORE,
):  # fmt: skip
    """The contract's wording, one chunk, block, head, query and key at a time (small n only)."""
    n, H, _ = q0.shape
    n_kv = k0.shape[1]
    group = H // n_kv
    B, G, W, C = block_size, cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    m = rotary.attention_scaling

    def at(x, p):
        c, s_ = (t * m for t in cos_sin(torch.tensor(p), rotary.inv_freq, x.dtype))
        return rotate(x, c, s_, rotary)

    @functools.cache
    def bound(i, h, blk):  # Quest: keys at position 0, query at position C
        keys = torch.stack([at(k0[j, h // group], 0) for j in range(blk * B, blk * B + B)])
        lo, hi, q = keys.min(0).values, keys.max(0).values, at(q0[i, h], C)
        return sum(max(float(q[c] * lo[c]), float(q[c] * hi[c])) for c in range(q.shape[0]))

    @functools.cache
    def block_lse(i, h, blk):  # log-sum-exp of the block's exact scores at distance C
        q = at(q0[i, h], C)
        keys = [at(k0[j, h // group], 0) for j in range(blk * B, blk * B + B)]
        if score == "mass_int8":  # each rounded to 8 bits: integers times their scales
            (q8, qs), rounded = rounded_8bit(q), [rounded_8bit(k) for k in keys]
            return torch.logsumexp(torch.stack([(q8 * k8).sum() * ks * qs * scale for k8, ks in rounded]), 0)
        return torch.logsumexp(torch.stack([(q * k).sum() * scale for k in keys]), 0)

    def share(i, h, blk, cand):  # the block's share of head h's softmax over every candidate block
        return float(torch.exp(block_lse(i, h, blk) - torch.logsumexp(torch.stack([block_lse(i, h, c) for c in cand]), 0)))

    out = torch.zeros(n, H, v.shape[-1], dtype=q0.dtype)
    last = None  # (row, chosen): the last selection a decode row scored, with that row
    for s, e in chunk_spans(n, chunks):
        g = _cdiv(G, B)
        cand = list(range(g, max(g, max(0, e - 1 - W + 1) // B)))
        chosen = []
        # a decode row keeps the last decode row's selection while that row is under topk_refresh
        # positions back and the selection holds min(k, |candidates|) blocks
        keep = (e - s == 1 and cand and last is not None and s - last[0] < cfg.topk_refresh
                and len(last[1][0]) >= min(topk, len(cand)))  # fmt: skip
        if keep:
            cand = []  # (nothing to score)
        for kv in range(n_kv):
            scores = []
            for blk in cand:
                rows = [e - 1] if chunk_rule == "last" else [i for i in range(s, e) if max(0, i - W + 1) // B > blk]
                per_row = []
                for i in rows:
                    heads = range(kv * group, (kv + 1) * group)
                    per_head = [bound(i, h, blk) if score == "bound" else share(i, h, blk, cand) for h in heads]
                    per_row.append(max(per_head) if group_reduce == "max" else sum(per_head))
                scores.append((-max(per_row), blk))
            chosen.append({blk for _, blk in sorted(scores)[:topk]})
        if keep:
            chosen = last[1]
        elif cand and e - s == 1:
            last = (e - 1, chosen)
        for i in range(s, e):
            for h in range(H):
                sc, vals = [], []
                for j in range(i + 1):
                    blk, first_window = j // B, max(0, i - W + 1) // B
                    if topk == 0:
                        seen = j < G or i - j < W  # SPEC.md
                    else:  # whole global blocks, whole window blocks, the chosen blocks
                        seen = blk < g or blk >= first_window or blk in chosen[h // group]
                    if not seen:
                        continue
                    d = i - j if i - j < W else min(i - j, C)
                    sc.append((at(q0[i, h], j + d) * at(k0[j, h // group], j)).sum() * scale)
                    vals.append(v[j, h // group])
                p = torch.softmax(torch.stack(sc), dim=0)
                out[i, h] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


def blockwise_topk_attention(
    q0, k0, v, cfg: LminfConfig, rotary: RotarySpec, scale: float, *, topk: int, block_size: int, chunks=None,
    group_reduce: str = DEFAULT_GROUP_REDUCE, chunk_rule: str = DEFAULT_CHUNK_RULE, rows_per_step: int = 256,
    on_selection=None, score: str = DEFAULT_SCORE,
):  # fmt: skip
    """The same contract for model-sized runs: per row block, only the visible columns, two matmuls.

    A pair at i - j <= C scores q rotated at i against k rotated at j; a pair at i - j > C
    (distance C) scores q rotated at C against k at position 0. Selection uses the matmul form
    of the bound (score "bound"). on_selection(selection), if given, sees the layer's selection.
    """
    n, H, D = q0.shape
    n_kv = k0.shape[1]
    group = H // n_kv
    B, G, W, C = block_size, cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    selection = topk_selections(q0, k0, cfg, rotary, topk, B, chunks, group_reduce, chunk_rule, block_bounds_matmul,
                                score, scale)  # fmt: skip
    if on_selection is not None:
        on_selection(selection)
    pos = torch.arange(n)
    cos_t, sin_t = (t * rotary.attention_scaling for t in cos_sin(pos, rotary.inv_freq, q0.dtype))
    q_rot = rotate(q0, cos_t[:, None], sin_t[:, None], rotary).view(n, n_kv, group, D)
    k_rot = rotate(k0, cos_t[:, None], sin_t[:, None], rotary)
    q_cap = query_at_cap(q0, cfg, rotary).view(n, n_kv, group, D)
    k_zero = keys_at_zero(k0, rotary)
    out = torch.empty(n, n_kv, group, v.shape[-1], dtype=q0.dtype)
    for s, e, per_head in selection:
        for a in range(s, e, rows_per_step):
            b = min(e, a + rows_per_step)
            i = pos[a:b, None]
            fwb = torch.clamp(i - W + 1, min=0) // B  # first window block per row
            extra = sorted({blk for blocks in per_head for blk in blocks})
            glob_end, win_start = (_cdiv(G, B) * B, int(fwb[0]) * B) if topk else (G, max(0, a - W + 1))
            cols = torch.unique(torch.cat([pos[: min(glob_end, b)], pos[win_start:b]]
                                          + [pos[blk * B : (blk + 1) * B] for blk in extra]))  # fmt: skip
            jj = cols[None, :]
            rel = i - jj
            if topk:
                seen = (jj < glob_end) | (jj // B >= fwb)
            else:
                seen = (rel < W) | (jj < G)
            visible = (seen & (rel >= 0))[:, None, :].repeat(1, n_kv, 1)  # [rows, Hkv, cols]
            for h, blocks in enumerate(per_head):
                for blk in blocks:
                    visible[:, h] |= (jj // B == blk) & (rel >= 0)
            scores = torch.einsum("rkgd,ckd->rkgc", q_rot[a:b], k_rot[cols])
            far = rel > C
            if far.any():
                capped = torch.einsum("rkgd,ckd->rkgc", q_cap[a:b], k_zero[cols])
                scores = torch.where(far[:, None, None, :], capped, scores)
            scores = (scores * scale).masked_fill(~visible[:, :, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[a:b] = torch.einsum("rkgc,ckd->rkgd", probs, v[cols])
    return out.reshape(n, H, v.shape[-1])
