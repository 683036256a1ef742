"""The top-k oracle (docs/topk-contract.md) against its own wording and its limiting cases."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lminf_vllm.block_policy import topk_attended_tokens
from lminf_vllm.config import LminfConfig
from lminf_vllm.rope import RotarySpec, cos_sin, default_inv_freq, rotate
from lminf_vllm.testing.reference import DenseLlama, dense_lambda_attention
from lminf_vllm.testing.topk_reference import (
    CHUNK_RULES,
    DEFAULT_SCORE,
    GROUP_REDUCE,
    SCORES,
    block_bounds,
    block_bounds_matmul,
    block_mass_shares,
    blockwise_topk_attention,
    brute_force_topk_attention,
    chunk_spans,
    dense_topk_attention,
    first_window_block,
    global_block_count,
    key_summaries,
    middle_blocks,
    query_at_cap,
    select_blocks,
    topk_mask_and_distance,
    topk_selections,
)


def qkv(n, H=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, D, dtype=torch.float64, generator=g) * 2 for h in (H, Hkv, Hkv))


def rope(D=8, neox=True, rotary_dim=None, scaling=1.0):
    rd = rotary_dim or D
    return RotarySpec(default_inv_freq(100.0, rd), rd, neox, scaling)


def score_at(q0, k0, j, d, rotary):
    """<R(j + d) q, R(j) k>: key j seen at distance d, rotated as reference.py does."""
    m = rotary.attention_scaling
    cq, sq = (t * m for t in cos_sin(torch.tensor(j + d), rotary.inv_freq, q0.dtype))
    ck, sk = (t * m for t in cos_sin(torch.tensor(j), rotary.inv_freq, q0.dtype))
    return (rotate(q0, cq, sq, rotary) * rotate(k0, ck, sk, rotary)).sum(-1)


@pytest.mark.parametrize("cfg", [LminfConfig(3, 5, 9), LminfConfig(0, 7, 7), LminfConfig(10, 4, 6), LminfConfig(2, 1, 1)])
@pytest.mark.parametrize("chunks", [None, 1, [20, 1, 1, 11]])
def test_k0_is_lambda_bit_for_bit(cfg, chunks):
    q, k, v = qkv(33)
    for rotary in (rope(), rope(neox=False, rotary_dim=6, scaling=1.3)):
        lam = dense_lambda_attention(q, k, v, cfg, rotary, 8**-0.5)
        for score in SCORES:  # k = 0 selects nothing, whatever the score
            got = dense_topk_attention(q, k, v, cfg, rotary, 8**-0.5, topk=0, block_size=4, chunks=chunks, score=score)
            assert torch.equal(got, lam)


def test_the_default_score_is_the_mass():
    assert DEFAULT_SCORE == "mass" and SCORES == ("mass", "bound", "mass_int8")


def test_middle_global_and_window_blocks_are_disjoint_and_cover():
    for G, W, B in [(10, 64, 16), (0, 5, 4), (3, 8, 4), (16, 16, 16), (5, 1, 2)]:
        cfg = LminfConfig(G, W, max(W, 9))
        g = global_block_count(cfg, B)
        for i in range(200):
            mid = set(middle_blocks(i, cfg, B))
            window = set(range(first_window_block(i, cfg, B), i // B + 1))
            assert not mid & set(range(g)) and not mid & window
            assert set(range(i // B + 1)) <= set(range(g)) | mid | window
            for b in mid:  # a middle block is complete, and every token of it is outside both branches
                assert b * B >= G and (b + 1) * B - 1 <= i - W


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("group_reduce,chunk_rule", [("max", "last"), ("sum", "max")])
def test_dense_equals_the_contracts_wording(group_reduce, chunk_rule, score):
    q, k, v = qkv(20, seed=1)
    cfg, rotary = LminfConfig(3, 5, 8), rope()
    kw = dict(topk=2, block_size=3, chunks=[12, 1, 7] if chunk_rule == "last" else [9, 1, 10],
              group_reduce=group_reduce, chunk_rule=chunk_rule, score=score)  # fmt: skip
    dense = dense_topk_attention(q, k, v, cfg, rotary, 8**-0.5, **kw)
    loop = brute_force_topk_attention(q, k, v, cfg, rotary, 8**-0.5, **kw)
    torch.testing.assert_close(dense, loop, atol=1e-12, rtol=0)


@pytest.mark.parametrize("score", SCORES)
def test_dense_equals_the_contracts_wording_with_decode_rows_keeping_selections(score):
    """Decode rows past the prompt keep the last selection for topk_refresh = 3 positions (and score
    again where the kept one has fewer blocks than they may read)."""
    q, k, v = qkv(30, seed=6)
    cfg, rotary = LminfConfig(2, 5, 7, topk_refresh=3), rope()
    kw = dict(topk=3, block_size=2, chunks=[9] + [1] * 21, score=score)
    dense = dense_topk_attention(q, k, v, cfg, rotary, 8**-0.5, **kw)
    loop = brute_force_topk_attention(q, k, v, cfg, rotary, 8**-0.5, **kw)
    torch.testing.assert_close(dense, loop, atol=1e-12, rtol=0)


@pytest.mark.parametrize("score", SCORES)
def test_decode_rows_score_every_topk_refresh_positions_and_keep_the_selection_between(score):
    """G = 2, W = 6, B = 2, k = 2: M(i) = [1, (i - 5) // 2). The prompt's last row (12) scores for
    the prompt only; the first decode row (13) scores, the next R - 1 keep its selection, then one
    scores again. At the start, a row whose kept selection holds fewer blocks than it may read
    scores anyway."""
    q, k, _ = qkv(60, seed=7)
    R = 4
    every = topk_selections(q, k, LminfConfig(2, 6, 6, topk_refresh=1), rope(), 2, 2, [13] + [1] * 47, score=score)
    kept = topk_selections(q, k, LminfConfig(2, 6, 6, topk_refresh=R), rope(), 2, 2, [13] + [1] * 47, score=score)
    by_row = {e - 1: heads for _, e, heads in kept}
    own = {e - 1: heads for _, e, heads in every}
    for i in range(13, 60):
        scorer = 13 + (i - 13) // R * R  # the last row that scored: the first decode row, then every R rows
        assert by_row[i] == own[scorer], i
    assert any(by_row[i] != own[i] for i in range(13, 60))  # keeping is not scoring at every row
    # A short prompt (rows 0-9): row 10 scores its only candidate (M = [1]); row 11 has two
    # candidates, more than the kept selection holds, so it scores although 11 - 10 < R.
    short = topk_selections(q[:20], k[:20], LminfConfig(2, 6, 6, topk_refresh=R), rope(), 2, 2, [10] + [1] * 10, score=score)
    sizes = {e - 1: len(heads[0]) for _, e, heads in short}
    assert sizes[9] == sizes[10] == 1 and sizes[11] == 2
    per_step = topk_selections(q[:20], k[:20], LminfConfig(2, 6, 6, topk_refresh=1), rope(), 2, 2, [10] + [1] * 10, score=score)
    assert {e - 1: h for _, e, h in short}[11] == {e - 1: h for _, e, h in per_step}[11]


@pytest.mark.parametrize("cfg,B,chunks,rotary,rule", [
    (LminfConfig(3, 9, 12), 4, [25, 1, 1, 1, 20], rope(), ("max", "last")),
    (LminfConfig(3, 9, 12, topk_refresh=2), 4, [25] + [1] * 23, rope(), ("max", "last")),
    (LminfConfig(8, 16, 16), 8, 17, rope(neox=False, rotary_dim=6, scaling=1.3), ("sum", "max")),
    (LminfConfig(0, 5, 30), 2, None, rope(), ("sum", "last")),
    (LminfConfig(5, 6, 6), 1, 9, rope(neox=False, rotary_dim=6, scaling=1.3), ("max", "max")),
])  # fmt: skip
@pytest.mark.parametrize("score", SCORES)
def test_blockwise_equals_dense(cfg, B, chunks, rotary, rule, score):
    q, k, v = qkv(48, seed=2)
    for topk in (0, 2):
        kw = dict(topk=topk, block_size=B, chunks=chunks, group_reduce=rule[0], chunk_rule=rule[1], score=score)
        dense = dense_topk_attention(q, k, v, cfg, rotary, 8**-0.5, **kw)
        fast = blockwise_topk_attention(q, k, v, cfg, rotary, 8**-0.5, rows_per_step=7, **kw)
        torch.testing.assert_close(fast, dense, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunks", [None, [25, 1, 1, 1, 12]])
def test_all_middle_blocks_and_no_cap_is_full_causal_attention(chunks):
    n = 40
    q, k, v = qkv(n, seed=3)
    cfg, rotary = LminfConfig(5, 6, n), rope()
    full = dense_lambda_attention(q, k, v, LminfConfig(0, n, n), rotary, 8**-0.5)
    got = dense_topk_attention(q, k, v, cfg, rotary, 8**-0.5, topk=n, block_size=4, chunks=chunks)
    torch.testing.assert_close(got, full, atol=1e-12, rtol=0)
    assert (got - dense_lambda_attention(q, k, v, cfg, rotary, 8**-0.5)).abs().max() > 0.1  # k = 0 differs


@pytest.mark.parametrize("G,B", [(5, 4), (0, 3)])
def test_all_middle_blocks_with_cap_is_full_attention_at_capped_distance(G, B):
    n = 40
    q, k, v = qkv(n, seed=4)
    cfg, rotary = LminfConfig(G, 6, 9), rope()
    # Λ with every key global: all visible, d = i - j below W, min(i - j, C) above
    capped = dense_lambda_attention(q, k, v, LminfConfig(n, 6, 9), rotary, 8**-0.5)
    got = dense_topk_attention(q, k, v, cfg, rotary, 8**-0.5, topk=n, block_size=B, chunks=[20, 1, 19])
    torch.testing.assert_close(got, capped, atol=1e-12, rtol=0)


@pytest.mark.parametrize("score", ["mass", "bound"])  # (the exact scores; "mass_int8" rounds them)
@pytest.mark.parametrize("group_reduce", GROUP_REDUCE)
def test_one_token_blocks_select_the_best_true_scores(group_reduce, score):
    """B = 1, W = C: every middle token is seen at distance C; the bound is its exact score, the
    mass its share of the head's softmax over the candidates (the group's max or sum of those)."""
    n, H, Hkv, topk = 30, 4, 2, 3
    q, k, _ = qkv(n, H, Hkv, seed=5)
    cfg, rotary = LminfConfig(2, 6, 6), rope()  # every row scores its own (topk_refresh 1)
    sel = topk_selections(q, k, cfg, rotary, topk, 1, 1, group_reduce, "last", score=score, scale=0.3)
    for s, e, per_head in sel:
        cand = list(middle_blocks(e - 1, cfg, 1))
        if not cand:
            assert per_head == [[], []]
            continue
        for h in range(Hkv):
            heads = range(h * H // Hkv, (h + 1) * H // Hkv)
            true = torch.stack([torch.stack([score_at(q[e - 1, x], k[j, h], j, cfg.distance_cap, rotary) for x in heads])
                                for j in cand])  # fmt: skip
            if score == "mass":  # [cand, heads]: each head's softmax over the candidates
                true = torch.softmax(true * 0.3, dim=0)
            true = true.amax(1) if group_reduce == "max" else true.sum(1)
            best = sorted(cand[int(t)] for t in true.argsort(descending=True)[:topk])
            assert per_head[h] == best, (s, h)


def test_ties_go_to_the_lower_block():
    cfg = LminfConfig(0, 4, 4)
    bounds = torch.zeros(1, 2, 10)  # one row, 2 heads (one KV head), 10 blocks, all equal
    bounds[0, :, 7] = 1.0
    assert select_blocks(bounds, 40, cfg, 4, 3, 1) == [[0, 1, 7]]  # candidates: blocks 0 .. 8


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), D=st.sampled_from([2, 4, 8]), start=st.integers(0, 5000), cap=st.integers(1, 5000),
       neox=st.booleans(), seed=st.integers(0, 10**6))  # fmt: skip
def test_the_bound_is_above_every_score_at_the_cap(B, D, start, cap, neox, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, D, dtype=torch.float64, generator=g) * 3
    k = torch.randn(start + B, 1, D, dtype=torch.float64, generator=g) * 3
    rotary = rope(D, neox)
    cfg = LminfConfig(0, 1, cap)
    kmin, kmax = key_summaries(k, B, rotary)
    blk = start // B  # a full block inside [0, start + B)
    q_cap = query_at_cap(q, cfg, rotary)
    bound = block_bounds(q_cap, kmin, kmax)[0, 0, blk]
    torch.testing.assert_close(block_bounds_matmul(q_cap, kmin, kmax)[0, 0, blk], bound, atol=1e-9, rtol=0)
    for j in range(blk * B, blk * B + B):
        assert score_at(q[0, 0], k[j, 0], j, cap, rotary) <= bound + 1e-9


@settings(max_examples=25, deadline=None)
@given(G=st.integers(0, 12), W=st.integers(1, 20), B=st.integers(1, 8), topk=st.integers(0, 4),
       chunk=st.integers(1, 30), seed=st.integers(0, 10**6))  # fmt: skip
def test_what_a_chunk_reads_fits_the_device_bound(G, W, B, topk, chunk, seed):
    n, n_kv = 60, 2
    cfg = LminfConfig(G, W, W)
    g = torch.Generator().manual_seed(seed)
    sel = [(s, e, select_blocks(torch.randn(e - s, n_kv, n // B, generator=g), s, cfg, B, topk, n_kv))
           for s, e in chunk_spans(n, chunk)]  # fmt: skip
    visible, dist = topk_mask_and_distance(n, cfg, B, topk, sel, n_kv)
    for s, e, per_head in sel:
        T = e - s
        bound = -(-G // B) + -(-(W - 1 + T) // B) + 1 + topk  # SPEC.md's blocks with T in flight, plus k
        for h in range(n_kv):
            assert len(per_head[h]) == min(topk, len(middle_blocks(e - 1, cfg, B)))
            read = {j // B for j in visible[s:e, :, h].any(0).nonzero().flatten().tolist()}
            assert len(read) <= bound
            if T == 1:  # a decode step
                assert len(read) <= -(-G // B) + -(-W // B) + 1 + topk
    rel = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    far = visible.any(-1) & (rel >= W)
    assert torch.equal(dist[far], rel[far].clamp(max=W))  # beyond the window: min(i - j, C)


@settings(max_examples=25, deadline=None)
@given(G=st.integers(0, 12), W=st.integers(1, 20), B=st.integers(1, 8), topk=st.integers(1, 4),
       seed=st.integers(0, 10**6))  # fmt: skip
def test_attended_tokens_per_query_peak_at_the_start_up_figure(G, W, B, topk, seed):
    # the figure the start-up warning compares with the training length (block_policy.topk_attended_tokens)
    n, n_kv = (-(-G // B) + topk + 4) * B + W, 2
    cfg = LminfConfig(G, W, W)
    g = torch.Generator().manual_seed(seed)
    sel = [(i, i + 1, select_blocks(torch.randn(1, n_kv, n // B + 1, generator=g), i, cfg, B, topk, n_kv))
           for i in range(n)]  # fmt: skip
    visible, _ = topk_mask_and_distance(n, cfg, B, topk, sel, n_kv)
    assert int(visible.sum(1).max()) == topk_attended_tokens(G, W, B, topk)


def test_dense_llama_takes_the_topk_attention(tiny_llama):
    ref = DenseLlama(tiny_llama)
    ids = torch.randint(1, 290, (80,), generator=torch.Generator().manual_seed(6)).tolist()
    cfg = LminfConfig(4, 24, 32)
    lam = ref.logits(ids, cfg)
    k0 = functools.partial(dense_topk_attention, topk=0, block_size=8, chunks=[60, 20])
    assert torch.equal(ref.logits(ids, cfg, attention=k0), lam)
    k2 = functools.partial(dense_topk_attention, topk=2, block_size=8, chunks=[60, 20])
    assert (ref.logits(ids, cfg, attention=k2) - lam).abs().max() > 1e-3


def test_mass_shares_are_each_blocks_share_of_the_softmax_at_the_cap():
    """block_mass_shares against the wording: per query head, the softmax over every candidate
    token scored at distance C (scaled), summed per block; the group max picks a block that only
    one head of the group cares for."""
    n, B, H, Hkv = 40, 4, 4, 2
    q, k, _ = qkv(n, H, Hkv, seed=8)
    cfg, rotary, scale = LminfConfig(0, 8, 8), rope(), 0.4
    cand = middle_blocks(n - 1, cfg, B)
    shares = block_mass_shares(query_at_cap(q[-1:], cfg, rotary), k, B, cand, rotary, scale)[0]  # [H, nb]
    for h in range(H):
        s = torch.stack([score_at(q[-1, h], k[j, h // 2], j, cfg.distance_cap, rotary)
                         for j in range(cand.start * B, cand.stop * B)]) * scale  # fmt: skip
        want = torch.softmax(s, 0).view(len(cand), B).sum(-1)
        torch.testing.assert_close(shares[h, cand.start : cand.stop], want, atol=1e-12, rtol=0)
        assert float(shares[h, : cand.start].abs().sum()) == 0 and float(shares[h, cand.stop :].abs().sum()) == 0
    # the selection is by the group's max of the shares: heads 0 and 1 read KV head 0
    sel = topk_selections(q, k, cfg, rotary, 1, B, None, score="mass", scale=scale)[0][2]
    for kv in range(Hkv):
        best = int(shares[2 * kv : 2 * kv + 2, cand.start : cand.stop].amax(0).argmax()) + cand.start
        assert sel[kv] == [best]


def test_mass_finds_a_block_the_bound_misses():
    """Why the mass (docs/topk-contract.md, "Natural text: what was tried"): a block of varied keys
    has a high bound (each channel's favourable extreme) though its keys cancel out; a block whose
    keys all match the query holds more of the softmax. The bound picks the first, the mass the second."""
    B, D = 4, 8
    cfg, rotary = LminfConfig(0, 4, 4), rope(D)  # scaling 1: a key at position 0 is k0 itself
    g = torch.Generator().manual_seed(11)
    q0 = torch.randn(13, 1, D, dtype=torch.float64, generator=g)
    u = query_at_cap(q0[-1:], cfg, rotary)[0, 0]
    u = u / u.norm()
    k0 = torch.randn(13, 1, D, dtype=torch.float64, generator=g) * 0.1
    k0[0:4, 0] = torch.stack([u * 3, -u * 3, u.flip(0) * 3, -u.flip(0) * 3])  # block 0: varied
    k0[4:8, 0] = u * 2.9  # block 1: every key aligned with the query
    assert list(middle_blocks(12, cfg, B)) == [0, 1]
    assert topk_selections(q0, k0, cfg, rotary, 1, B, None, score="bound")[0][2] == [[0]]
    assert topk_selections(q0, k0, cfg, rotary, 1, B, None, score="mass", scale=1.0)[0][2] == [[1]]
