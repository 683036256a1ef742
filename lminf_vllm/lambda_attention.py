"""The Λ-shaped attention of SPEC.md over a paged KV cache, in plain PyTorch.

The shared math below the paths: the PyTorch path serves every row with it,
the CPU-kernel path the rows its kernel cannot take. No vLLM import; the tests
call these functions directly on hand-made caches too. Cache layouts: see
kv_layout.py.

What a query at position i may read is derived from (i, G, W) alone, never from
the block table: freed block ids stay in the table and are reused by others.
"""

from dataclasses import dataclass

import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.kv_layout import OWN_LAYOUT, gather_kv, read_blocks
from lminf_vllm.rope import RotarySpec, cos_sin, rotate

# Queries are processed in spans of this many so that a long prefill chunk
# costs O(span * (G + W + span)) memory, not O(chunk^2).
QUERY_SPAN = 256


def attend_span(
    q: torch.Tensor,  # [T, H, D], already rotated at true positions q_start .. q_start+T-1
    q_start: int,
    k_glob: torch.Tensor,  # [Gk, Hkv, D] keys at positions 0 .. Gk-1
    v_glob: torch.Tensor,
    k_loc: torch.Tensor,  # [Lk, Hkv, D] keys at positions loc_start .. loc_start+Lk-1
    v_loc: torch.Tensor,
    loc_start: int,
    cfg: LminfConfig,
    scale: float,
    rotary: RotarySpec | None,
    alibi: torch.Tensor | None = None,  # [H] slopes: score - m * d (ALiBi models, rotary None)
) -> torch.Tensor:
    """One softmax over the visible global and local keys; returns [T, H, Dv] in float32."""
    T, H, D = q.shape
    Hkv = k_loc.shape[1]
    qf = q.float().view(T, Hkv, H // Hkv, D)
    dev = q.device
    i = torch.arange(q_start, q_start + T, device=dev)

    # Local branch: plain attention, keys are stored rotated at their true position.
    j = torch.arange(loc_start, loc_start + k_loc.shape[0], device=dev)
    dist = i[:, None] - j[None, :]
    local_ok = (dist >= 0) & (dist < cfg.local_tokens)
    scores = [torch.einsum("tkgd,lkd->tkgl", qf, k_loc.float()) * scale]
    if alibi is not None:
        scores[0] -= alibi.view(1, Hkv, -1, 1) * dist[:, None, None, :]
    scores[0].masked_fill_(~local_ok[:, None, None, :], float("-inf"))
    values = [v_loc]

    if k_glob.shape[0]:
        s_glob, dist_g = _global_scores(qf, q_start, k_glob.float(), cfg, scale, rotary)
        if alibi is not None:  # ALiBi: the bias sees the capped distance
            s_glob -= alibi.view(1, Hkv, -1, 1) * dist_g.clamp(max=cfg.distance_cap)[:, None, None, :]
        s_glob.masked_fill_(~(dist_g >= cfg.local_tokens)[:, None, None, :], float("-inf"))
        scores.insert(0, s_glob)
        values.insert(0, v_glob)

    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    out = torch.einsum("tkgl,lkd->tkgd", probs, torch.cat(values, dim=0).float())
    return out.reshape(T, H, -1)


def _paged_fused_cpu(q, kv_cache, block_row, seq_len, cfg, scale, rotary, layout):
    """paged_lambda_attention on CPU for RoPE and NoPE models:
    - the window keys of the whole chunk are gathered once; each span of
      QUERY_SPAN queries runs PyTorch's fused flash attention over its slice of
      them (which also returns each row's log-sum-exp);
    - the global branch runs once for the whole chunk: past the cap the score
      <R(C - (i - j)) q_i, k_j> is computed as <R(C - i) q_i, R(-j) k_j>, one
      rotation per query and one per key (as the Triton kernel does), not a
      rotated copy of every query per key;
    - the two branches are merged by their log-sum-exps (as vLLM's merge_attn_states)."""
    T, H, D = q.shape
    first = seq_len - T
    W = cfg.local_tokens
    lo_all = max(0, first - W + 1)  # oldest key of any window of this chunk
    k_loc, v_loc = gather_kv(kv_cache, block_row, lo_all, seq_len, D, layout)
    Hkv, Dv = k_loc.shape[1], v_loc.shape[-1]
    g = H // Hkv
    k_all, v_all = k_loc.float().transpose(0, 1)[None], v_loc.float().transpose(0, 1)[None]  # [1, Hkv, L, D]
    qf = q.float().view(T, Hkv, g, D)
    out = torch.empty(Hkv, g, T, Dv)
    lse = torch.empty(Hkv, g, T, 1)
    for a in range(first, seq_len, QUERY_SPAN):
        b = min(a + QUERY_SPAN, seq_len)
        lo = max(0, a - W + 1)
        # The query heads of a KV head become extra query rows: GQA without copying keys.
        rows = qf[a - first : b - first].permute(1, 2, 0, 3).reshape(1, Hkv, g * (b - a), D)
        o_s, lse_s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            rows, k_all[:, :, lo - lo_all : b - lo_all], v_all[:, :, lo - lo_all : b - lo_all], 0.0, False,
            attn_mask=_local_mask(b - a, b - lo, a - lo, W, g, q.device), scale=scale,
        )  # [1, Hkv, g * t, Dv], [1, Hkv, g * t]
        out[:, :, a - first : b - first] = o_s.view(Hkv, g, b - a, Dv)
        lse[:, :, a - first : b - first] = lse_s.view(Hkv, g, b - a, 1)
    n_glob = max(0, min(cfg.global_tokens, seq_len - W))  # globals some query sees outside its window
    if n_glob:
        k_glob, v_glob = gather_kv(kv_cache, block_row, 0, n_glob, D, layout)
        s_glob, dist_g = _global_scores(qf, first, k_glob.float(), cfg, scale, rotary)
        s_glob = s_glob.permute(1, 2, 0, 3).masked_fill(~(dist_g >= W), float("-inf"))  # [Hkv, g, T, Gk]
        lse_glob = torch.logsumexp(s_glob, dim=-1, keepdim=True)  # -inf where no global key is visible
        o_glob = torch.einsum("kgtj,jkd->kgtd", torch.exp(s_glob - lse_glob.clamp(min=-1e30)), v_glob.float())
        top = torch.maximum(lse, lse_glob)  # finite: every query sees its own key
        w_loc, w_glob = torch.exp(lse - top), torch.exp(lse_glob - top)
        out = (out * w_loc + o_glob * w_glob) / (w_loc + w_glob)
    return out.permute(2, 0, 1, 3).reshape(T, H, Dv)


def _global_scores(qf, q_start, k_glob, cfg, scale, rotary):
    """Unmasked scores [T, Hkv, g, Gk] of queries qf [T, Hkv, g, D] (at q_start ..)
    against the global keys 0 .. Gk-1 [Gk, Hkv, D], and the true distances [T, Gk].
    Past the cap (i - j > C) the model is shown distance C: since rotations
    compose, <R(C - (i - j)) q_i, k_j> = <R(C - i) q_i, R(-j) k_j>."""
    T, Gk = qf.shape[0], k_glob.shape[0]
    i = torch.arange(q_start, q_start + T, device=qf.device)
    j = torch.arange(Gk, device=qf.device)
    dist = i[:, None] - j[None, :]
    plain = torch.einsum("tkgd,jkd->tkgj", qf, k_glob) * scale
    past_cap = dist > cfg.distance_cap
    if rotary is None or not bool(past_cap.any()):
        return plain, dist
    q_cap, k_cap = capped_rotations(qf, q_start, k_glob, cfg.distance_cap, rotary)
    capped = torch.einsum("tkgd,jkd->tkgj", q_cap, k_cap) * scale
    return torch.where(past_cap[:, None, None, :], capped, plain), dist


def capped_rotations(q, q_start: int, k_glob, distance_cap: int, rotary: RotarySpec):
    """(R(C - i) q_i, R(-j) k_j) in float32 for queries q [T, ...heads, D] at
    q_start .. and the global keys k_glob [Gk, Hkv, D]: their dot products are
    the scores at the capped distance C (rotations compose)."""
    T, Gk = q.shape[0], k_glob.shape[0]
    i = torch.arange(q_start, q_start + T, device=q.device)
    cos_q, sin_q = cos_sin(distance_cap - i, rotary.inv_freq, torch.float32)  # angles formed in float64
    cos_k, sin_k = cos_sin(-torch.arange(Gk, device=q.device), rotary.inv_freq, torch.float32)
    heads = (slice(None),) + (None,) * (q.dim() - 2)  # broadcast over the head axes
    q_cap = rotate(q.float(), cos_q[heads], sin_q[heads], rotary)
    return q_cap, rotate(k_glob.float(), cos_k[:, None], sin_k[:, None], rotary)


_MASKS: dict = {}


def _local_mask(T: int, L: int, offset: int, W: int, g: int, device) -> torch.Tensor:
    """[g * T, L] additive mask of the local branch: query t (at key index offset + t)
    sees key l when 0 <= offset + t - l < W. Spans inside a long prefill share one."""
    key = (T, L, offset, W, g, str(device))
    mask = _MASKS.get(key)
    if mask is None:
        dist = torch.arange(offset, offset + T, device=device)[:, None] - torch.arange(L, device=device)[None, :]
        mask = torch.zeros(T, L, device=device).masked_fill_(~((dist >= 0) & (dist < W)), float("-inf"))
        mask = mask.repeat(g, 1)
        if len(_MASKS) >= 8:  # a few MB each: keep the recent ones
            _MASKS.clear()
        _MASKS[key] = mask
    return mask


def paged_lambda_attention(
    q: torch.Tensor,  # [T, H, D] the request's queries this step
    kv_cache: torch.Tensor,
    block_row: torch.Tensor,  # [max_blocks] the request's block table
    seq_len: int,  # tokens computed after this step (the last query is at seq_len - 1)
    cfg: LminfConfig,
    scale: float,
    rotary: RotarySpec | None,
    alibi: torch.Tensor | None = None,
    layout: str = OWN_LAYOUT,
) -> torch.Tensor:
    """Λ-attention for one request's queries over its paged cache. -> [T, H, Dv] float32."""
    if q.device.type == "cpu" and alibi is None:
        return _paged_fused_cpu(q, kv_cache, block_row, seq_len, cfg, scale, rotary, layout)
    T, _, D = q.shape
    first = seq_len - T
    G, W = cfg.global_tokens, cfg.local_tokens
    outs = []
    for a in range(first, seq_len, QUERY_SPAN):
        b = min(a + QUERY_SPAN, seq_len)
        lo = max(0, a - W + 1)  # oldest key in any window of this span
        n_glob = max(0, min(G, b - W))  # global keys that some query here sees outside its window
        k_loc, v_loc = gather_kv(kv_cache, block_row, lo, b, D, layout)
        k_glob, v_glob = gather_kv(kv_cache, block_row, 0, n_glob, D, layout)
        outs.append(
            attend_span(q[a - first : b - first], a, k_glob, v_glob, k_loc, v_loc, lo, cfg, scale, rotary, alibi)
        )
    return torch.cat(outs, dim=0)


# Decode steps of many requests are batched into one gather and one softmax;
# requests are grouped so that a group gathers at most this many keys.
DECODE_KEYS_PER_GROUP = 1 << 16


@dataclass
class DecodePlan:
    """Which cache blocks a group of decode queries reads: the index work of one
    step, shared by every layer (built once per step by the metadata builder).
    Whole blocks are gathered (one contiguous copy each, several times cheaper
    than a row at a time); the slots a query may not read are masked."""

    first: int  # the group is decode rows [first, first + R)
    blocks: torch.Tensor  # [R, nb] physical blocks: the global blocks, then the window blocks
    valid: torch.Tensor  # [R, nb * B] may the query read that slot (each visible key exactly once)
    glob_slots: int  # the first glob_slots slots (whole global blocks) are the global branch
    glob_delta: torch.Tensor  # [R, glob_slots] query re-rotation per global slot: min(d, C) - d
    seen_dist: torch.Tensor  # [R, nb * B] distance the model is shown per slot (ALiBi's d)


def plan_decode(
    seq_lens: torch.Tensor, block_table: torch.Tensor, cfg: LminfConfig, block_size: int, rows: torch.Tensor | None = None
) -> list[DecodePlan]:
    """Plans for R decode queries, one per request at position seq_lens[r] - 1; request r's
    blocks are in table row rows[r] (default: row r)."""
    if not seq_lens.numel():
        return []
    B = block_size
    longest = int(seq_lens.max())
    L = min(cfg.local_tokens, longest)  # window keys: no request needs more
    n_glob = max(0, min(cfg.global_tokens, longest - cfg.local_tokens))  # globals outside any window
    nbg = -(-n_glob // B)  # global blocks
    nbw = min(-(-L // B) + 1, -(-longest // B))  # blocks an L-token window can touch
    group = max(1, DECODE_KEYS_PER_GROUP // ((nbg + nbw) * B))
    dev = seq_lens.device
    # a table row is max_model_len / B wide: index the rows and columns needed, copy no row whole
    rows = torch.arange(seq_lens.numel(), device=dev) if rows is None else rows
    plans = []
    for a in range(0, seq_lens.numel(), group):
        pos_q = (seq_lens[a : a + group] - 1)[:, None]  # [R, 1]
        R = pos_q.shape[0]
        first_win = (pos_q - L + 1).clamp(min=0) // B
        blk = torch.cat((torch.arange(nbg, device=dev).expand(R, nbg), first_win + torch.arange(nbw, device=dev)), dim=1)
        pos = (blk[:, :, None] * B + torch.arange(B, device=dev)).flatten(1)  # [R, nb * B]
        dist = pos_q - pos  # < 0 past the query: such slots are masked
        g = nbg * B
        d_g = dist[:, :g].clamp(min=0)
        valid = torch.cat(
            (
                (pos[:, :g] < cfg.global_tokens) & (dist[:, :g] >= cfg.local_tokens),  # outside the window
                (dist[:, g:] >= 0) & (dist[:, g:] < cfg.local_tokens),  # the window (a global key in it counts here)
            ),
            dim=1,
        )
        # Blocks past the request's last one are not its own: read its last
        # block instead (all masked), never an id from the table's tail.
        blk = torch.minimum(blk, pos_q // B)
        plans.append(
            DecodePlan(
                first=a,
                blocks=block_table[rows[a : a + group, None], blk].long(),  # only the columns needed
                valid=valid,
                glob_slots=g,
                glob_delta=d_g.clamp(max=cfg.distance_cap) - d_g,
                seen_dist=torch.cat((d_g.clamp(max=cfg.distance_cap), dist[:, g:]), dim=1),
            )
        )
    return plans


def decode_lambda_attention(
    q: torch.Tensor,  # [R, H, D]: one query per request
    kv_cache: torch.Tensor,
    plans: list[DecodePlan],
    scale: float,
    rotary: RotarySpec | None,
    alibi: torch.Tensor | None = None,
    layout: str = OWN_LAYOUT,
) -> torch.Tensor:
    """Λ-attention for R decode queries at once (no loop over requests). -> [R, H, Dv] float32."""
    return torch.cat([_decode_group(q, kv_cache, plan, scale, rotary, alibi, layout) for plan in plans], dim=0)


def _decode_group(q, kv_cache, plan: DecodePlan, scale, rotary, alibi=None, layout=OWN_LAYOUT):
    R, nb = plan.blocks.shape
    q = q[plan.first : plan.first + R]
    _, H, D = q.shape
    _, Hkv, B, twoD = kv_cache.shape
    kv = read_blocks(kv_cache, plan.blocks, layout).reshape(R, nb * B, Hkv, twoD).float()  # [R, K, Hkv, 2D]
    # Slots a request may not read (freed blocks reused elsewhere, never-written
    # memory) may hold anything, NaN included: zero them, since 0 * NaN = NaN.
    kv.masked_fill_(~plan.valid[:, :, None, None], 0.0)
    k, v = kv[..., :D], kv[..., D:]
    qf = q.float().view(R, Hkv, H // Hkv, D)
    g = plan.glob_slots
    scores = [torch.einsum("rkgd,rlkd->rkgl", qf, k[:, g:]) * scale]
    if g and rotary is None:
        scores.insert(0, torch.einsum("rkgd,rjkd->rkgj", qf, k[:, :g]) * scale)
    elif g:
        cos, sin = cos_sin(plan.glob_delta, rotary.inv_freq, torch.float32)  # [R, G, F]
        q_moved = rotate(qf[:, None], cos[:, :, None, None], sin[:, :, None, None], rotary)  # [R, G, Hkv, g, D]
        scores.insert(0, torch.einsum("rjkgd,rjkd->rkgj", q_moved, k[:, :g]) * scale)
    s = torch.cat(scores, dim=-1)
    if alibi is not None:
        s = s - alibi.view(1, Hkv, -1, 1) * plan.seen_dist[:, None, None, :]
    s = s.masked_fill(~plan.valid[:, None, None, :], float("-inf"))
    out = torch.einsum("rkgl,rlkd->rkgd", torch.softmax(s, dim=-1), v)
    return out.reshape(R, H, -1)


@dataclass
class RowsPlan:
    """The requests of a step this math serves, planned once for every layer:
    single-query requests (decodes) batched, multi-query ones (prefill chunks)
    one by one."""

    layout: str
    decode_tokens: torch.Tensor  # [R] long: each decode's query token in the batch
    decode_plans: list[DecodePlan]
    chunks: list[tuple[int, int, int, int]]  # (request, first token, last token + 1, seq_len after the step)

    @property
    def num_rows(self) -> int:
        return int(self.decode_tokens.numel()) + sum(b - a for _, a, b, _ in self.chunks)


def plan_rows(requests, block_table: torch.Tensor, cfg: LminfConfig, block_size: int, layout: str) -> RowsPlan:
    """requests: (request index, first token, query count, seq_len after the step)."""
    dev = block_table.device
    decodes = [r for r in requests if r[2] == 1]
    seq = torch.tensor([r[3] for r in decodes], dtype=torch.long, device=dev)
    rows = torch.tensor([r[0] for r in decodes], dtype=torch.long, device=dev)
    return RowsPlan(
        layout=layout,
        decode_tokens=torch.tensor([r[1] for r in decodes], dtype=torch.long, device=dev),
        decode_plans=plan_decode(seq, block_table, cfg, block_size, rows),
        chunks=[(r, a, a + t, n) for r, a, t, n in requests if t > 1],
    )


def attend_rows(
    plan: RowsPlan,
    query: torch.Tensor,  # [T, H, D] the whole batch
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cfg: LminfConfig,
    scale: float,
    rotary: RotarySpec | None,
    alibi: torch.Tensor | None,
    output: torch.Tensor,  # [T, H, Dv]: the planned rows are written
) -> None:
    if plan.decode_tokens.numel():
        output[plan.decode_tokens] = decode_lambda_attention(
            query[plan.decode_tokens], kv_cache, plan.decode_plans, scale, rotary, alibi, plan.layout
        ).to(output.dtype)
    for r, a, b, n in plan.chunks:
        out = paged_lambda_attention(query[a:b], kv_cache, block_table[r], n, cfg, scale, rotary, alibi, plan.layout)
        output[a:b] = out.to(output.dtype)
