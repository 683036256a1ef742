"""Top-k attention of docs/topk-contract.md over a paged cache and the host store, in PyTorch.

The engine's math for topk_blocks > 0 (paths/topk.py drives it); the oracle is
testing/topk_reference.py. Three jobs, no vLLM import:
  * summaries of complete blocks (keys rotated back to position 0, min and max);
  * a chunk's selection: its last row's query rotated to position C against the
    summaries of its middle blocks (Quest's bound, max over the GQA group, the
    k best, lower block first on ties);
  * the chunk's attention: one softmax over what the pool still holds (whole
    global blocks, whole window blocks) and the selected blocks from the store.

Scores: a key at i - j <= C is read as stored, <q_i, k_j>; one further back is
seen at distance C, <R(C - i) q_i, R(-j) k_j> (rotations compose), the same
rewrite the global branch of SPEC.md uses. Only keys with j < i - C need it:
the global blocks, the old edge of the first window block, the selected blocks.
"""

import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.kv_layout import read_rows
from lminf_vllm.rope import RotarySpec, cos_sin, rotate

# Rows of a prefill chunk attended at once: O(span x (G + W + span)) scores.
QUERY_SPAN = 256


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def global_blocks(cfg: LminfConfig, B: int) -> int:
    return _cdiv(cfg.global_tokens, B)


def first_window_block(i: int, cfg: LminfConfig, B: int) -> int:
    return max(0, i - cfg.local_tokens + 1) // B


def _moved(x: torch.Tensor, positions: torch.Tensor, rotary: RotarySpec) -> torch.Tensor:
    """x [N, ..., D] (float32) rotated by positions[N] (one angle per leading row)."""
    cos, sin = cos_sin(positions, rotary.inv_freq, torch.float32)
    shape = (positions.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    return rotate(x, cos.view(shape), sin.view(shape), rotary)


def block_summaries(keys: torch.Tensor, first_block: int, rotary: RotarySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [n, B, Hkv, D] of blocks first_block.., rotated at their positions -> lo, hi [n, Hkv, D] float32."""
    n, B, Hkv, D = keys.shape
    pos = torch.arange(first_block * B, (first_block + n) * B, device=keys.device)
    at_zero = _moved(keys.reshape(n * B, Hkv, D).float(), -pos, rotary).view(n, B, Hkv, D)
    return at_zero.amin(dim=1), at_zero.amax(dim=1)


def select_blocks(q_last: torch.Tensor, position: int, lo: torch.Tensor, hi: torch.Tensor, first: int, k: int,
                  cfg: LminfConfig, rotary: RotarySpec) -> torch.Tensor:  # fmt: skip
    """The chunk's selection: q_last [H, D] rotated at `position` (the chunk's last row);
    lo, hi [nc, Hkv, D] the summaries of its candidate blocks first .. first + nc - 1.
    -> [Hkv, min(k, nc)] block numbers, ascending per KV head."""
    nc, Hkv, D = lo.shape
    H = q_last.shape[0]
    q_cap = _moved(q_last.float()[None], torch.tensor([cfg.distance_cap - position]), rotary)[0]
    q = q_cap.view(Hkv, H // Hkv, D)
    # Quest: sum_c max(q_c lo_c, q_c hi_c) = q+ . hi + q- . lo
    bound = torch.einsum("kgd,nkd->kgn", q.clamp(min=0), hi) + torch.einsum("kgd,nkd->kgn", q.clamp(max=0), lo)
    score = bound.amax(dim=1)  # [Hkv, nc]: a block matters if it matters to any head of the group
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]  # stable: lower block on ties
    return torch.sort(order, dim=-1).values + first


def _scores(qf, q_cap, i, keys, pos, cap: int, rotary):
    """[T, Hkv, g, L] scores of queries qf [T, Hkv, g, D] at rows i [T] against keys at positions pos.

    keys [L, Hkv, D] with pos [L] (shared by the heads), or [Hkv, L, D] with pos [Hkv, L] (per KV head)."""
    per_head = pos.dim() == 2
    plain = torch.einsum("tkgd,kld->tkgl" if per_head else "tkgd,lkd->tkgl", qf, keys)
    far_pos = pos.amin() if pos.numel() else None
    if far_pos is None or int(i[-1]) - int(far_pos) <= cap:
        return plain
    # only keys that some row sees past the cap need the second rotation
    if per_head:
        cos, sin = cos_sin(-pos, rotary.inv_freq, torch.float32)  # [Hkv, L, F]
        at_zero = rotate(keys, cos, sin, rotary)
        capped = torch.einsum("tkgd,kld->tkgl", q_cap, at_zero)
        far = (i[:, None, None] - pos[None]) > cap  # [T, Hkv, L]
        return torch.where(far[:, :, None, :], capped, plain)
    n_far = int((pos < int(i[-1]) - cap).sum())  # pos ascending: a prefix
    at_zero = _moved(keys[:n_far], -pos[:n_far], rotary)
    capped = torch.einsum("tkgd,lkd->tkgl", q_cap, at_zero)
    far = (i[:, None] - pos[None, :n_far]) > cap  # [T, n_far]
    plain[..., :n_far] = torch.where(far[:, None, None, :], capped, plain[..., :n_far])
    return plain


def attend_chunk(
    q: torch.Tensor,  # [T, H, D] rows s .. s + T - 1, rotated at their positions
    s: int,
    kv_cache: torch.Tensor,
    block_row: torch.Tensor,  # the request's block table
    layout: str,
    chosen: torch.Tensor,  # [Hkv, k] the chunk's selected blocks (k may be 0)
    store_kv: tuple[torch.Tensor, torch.Tensor] | None,  # their keys, values [Hkv, k * B, D] (None when k = 0)
    cfg: LminfConfig,
    scale: float,
    rotary: RotarySpec,
) -> torch.Tensor:
    """Top-k attention of one chunk. -> [T, H, Dv] float32."""
    T, H, D = q.shape
    B = kv_cache.shape[2]
    g, C = global_blocks(cfg, B), cfg.distance_cap
    dev = q.device
    Hkv = chosen.shape[0]
    out = []
    for a in range(s, s + T, QUERY_SPAN):
        b = min(a + QUERY_SPAN, s + T)
        i = torch.arange(a, b, device=dev)
        fa = first_window_block(a, cfg, B)
        # What the pool holds for these rows: the global blocks, then the window blocks from fa on.
        glob_end = min(g * B, fa * B, b)
        pos = torch.cat((torch.arange(0, glob_end, device=dev), torch.arange(fa * B, b, device=dev)))
        k_pool, v_pool = read_rows(kv_cache, block_row[pos // B].long(), pos % B, D, layout)
        qf = q[a - s : b - s].float().view(b - a, Hkv, H // Hkv, D)
        q_cap = _moved(qf, C - i, rotary)
        blk = pos // B
        fwb = (i - cfg.local_tokens + 1).clamp(min=0) // B
        seen = (pos[None] <= i[:, None]) & ((blk[None] < g) | (blk[None] >= fwb[:, None]))  # [T', L]
        seen = seen[:, None, :].expand(-1, Hkv, -1)
        if chosen.numel():  # selected blocks the pool still holds (a long chunk's own past): per head
            picked = (blk[None, :, None] == chosen[:, None, :].to(dev)).any(-1)  # [Hkv, L]
            seen = seen | (picked[None] & (pos[None, None, :] <= i[:, None, None]))
        scores = [_scores(qf, q_cap, i, k_pool.float(), pos, C, rotary)]
        masks, values = [seen], [v_pool.float().transpose(0, 1)]  # values per head: [Hkv, L, Dv]
        if chosen.numel():  # the rest come from the store
            k_st, v_st = store_kv
            pos_st = (chosen.to(dev)[:, :, None] * B + torch.arange(B, device=dev)).flatten(1)  # [Hkv, k * B]
            scores.append(_scores(qf, q_cap, i, k_st.float(), pos_st, C, rotary))
            masks.append(((pos_st < fa * B)[None] & (pos_st[None] <= i[:, None, None])))
            values.append(v_st.float())
        s_all = torch.cat(scores, dim=-1) * scale
        s_all = s_all.masked_fill(~torch.cat(masks, dim=-1)[:, :, None, :], float("-inf"))
        probs = torch.softmax(s_all, dim=-1)
        out.append(torch.einsum("tkgl,kld->tkgd", probs, torch.cat(values, dim=1)).reshape(b - a, H, -1))
    return torch.cat(out, dim=0)
