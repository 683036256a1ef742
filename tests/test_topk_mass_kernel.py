"""The mass score's C++ pass (paths/topk/mass_kernel.py) against float64 and the eager ops.

Awkward sizes as the engine meets them: a piece of one block, KV heads and query groups of one,
head sizes and block sizes that are no multiple of the vector width, rows of uneven pieces, keys
in every cache dtype, the store's chunk slices (a storage offset)."""

import pytest
import torch

import helpers

from lminf_vllm.config import LminfConfig
from lminf_vllm.paths.topk import attention, mass_kernel, sketch, store as topk_store


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("pieces", "Hkv", "g", "B", "D"), [([[1]], 3, 3, 128, 64), ([[5, 2], [1]], 1, 4, 16, 80),
                                                              ([[16], [3, 16, 1]], 2, 1, 20, 40),
                                                              ([[7], [2]], 4, 2, 32, 130),
                                                              # tiles of 16 keys and a tail, groups of 1, 2 and 4
                                                              ([[2, 1]], 2, 2, 40, 64), ([[1], [3]], 1, 1, 48, 32),
                                                              ([[2]], 2, 4, 35, 96)])  # fmt: skip
def test_block_lse_is_float64s_for_every_row_and_block(dtype, pieces, Hkv, g, B, D):
    assert mass_kernel.usable(dtype), "the C++ pass could not be built on this machine"
    gen = torch.Generator().manual_seed(B * 1000 + D)
    rows = [[(torch.randn(n, Hkv, B, D, generator=gen) * 2).to(dtype) for n in ns] for ns in pieces]
    q = torch.randn(len(rows), Hkv, g, D, generator=gen)
    got = mass_kernel.block_lse(rows, q, 0.2)
    C = max(sum(ns) for ns in pieces)
    assert got.shape == (len(rows), Hkv, g, C) and got.dtype == torch.float32
    for r, ps in enumerate(rows):
        want = torch.cat([mass_kernel.reference_lse(p, q[r], 0.2) for p in ps]).permute(1, 2, 0)
        torch.testing.assert_close(got[r, ..., : want.shape[-1]].double(), want, atol=5e-5, rtol=1e-5)
        assert torch.isinf(got[r, ..., want.shape[-1] :]).all()  # past the row's blocks


def test_a_slice_of_a_chunk_scores_as_its_blocks_do_in_the_chunk():
    gen = torch.Generator().manual_seed(1)
    chunk = torch.randn(16, 3, 128, 64, generator=gen).bfloat16()
    q = torch.randn(1, 3, 3, 64, generator=gen)
    whole = mass_kernel.block_lse([[chunk]], q, 0.125)
    torch.testing.assert_close(mass_kernel.block_lse([[chunk[5:11], chunk[11:12]]], q, 0.125)[..., :7],
                               whole[..., 5:12], atol=0, rtol=0)  # fmt: skip


def test_mass_scores_and_the_selection_are_the_same_either_way(monkeypatch):
    """attention.mass_scores_rows through the C++ pass and through the eager ops (the switch off),
    rows of uneven pieces: the same scores to float32 rounding, the same picks (a planted block)."""
    gen = torch.Generator().manual_seed(2)
    rows = [[torch.randn(n, 3, 128, 64, generator=gen).bfloat16() for n in ns] for ns in ((3, 16, 1, 9), (4,))]
    q = torch.randn(2, 9, 64, generator=gen)
    rows[0][1][4, 2] = (q[0, 6:9].mean(0) * 3).bfloat16()  # block 7 of row 0 draws KV head 2's queries
    fast = attention.mass_scores_rows(q, rows, 0.125)
    picks = attention.select_from_mass(q[0], rows[0], 10, 4, 0.125)
    assert fast.shape == (2, 3, 29) and torch.isinf(fast[1, :, 4:]).all()
    monkeypatch.setenv(mass_kernel.ENV_SWITCH, "0")
    assert not mass_kernel.usable(torch.bfloat16)
    torch.testing.assert_close(fast, attention.mass_scores_rows(q, rows, 0.125), atol=2e-5, rtol=2e-6)
    assert torch.equal(picks, attention.select_from_mass(q[0], rows[0], 10, 4, 0.125))
    assert 10 + 7 in picks[2].tolist()


def test_a_pass_that_cannot_be_built_says_so_and_leaves_the_eager_ops(monkeypatch, caplog):
    """No compiler, another torch: kernel_ok warns and usable says no (attention.py then scores
    with the eager ops), instead of failing the engine's step."""
    helpers.unbuildable_pass_warns(mass_kernel, monkeypatch, caplog, "C++ pass is unavailable")


# ---------------------------------------------------------------- the 8-bit copy (topk_score "mass_int8")

needs_vnni = pytest.mark.skipif(not torch.cpu._is_vnni_supported(), reason="the 8-bit pass needs AVX-512 VNNI")


def sketched_rows(pieces, Hkv, B, D, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[sketch.sketch_keys((torch.randn(n, Hkv, B, D, generator=gen) * 2).bfloat16()) for n in ns]
            for ns in pieces]  # fmt: skip


@needs_vnni
@pytest.mark.parametrize(("pieces", "Hkv", "g", "B", "D"), [([[1]], 3, 3, 128, 64), ([[5, 2], [1]], 1, 4, 16, 64),
                                                              ([[16], [3, 16, 1]], 2, 1, 32, 128),
                                                              ([[2, 1]], 2, 2, 48, 24), ([[1], [3]], 1, 3, 16, 200)])  # fmt: skip
def test_the_8_bit_pass_is_float64s_for_every_row_and_block(pieces, Hkv, g, B, D):
    """One tile a block and several, every group size, head sizes of 24 to 200."""
    assert mass_kernel.sketch_usable(g, B, D), "the 8-bit pass could not be built on this machine"
    rows = sketched_rows(pieces, Hkv, B, D, seed=B * 1000 + D)
    q = torch.randn(len(rows), Hkv, g, D, generator=torch.Generator().manual_seed(B))
    got = mass_kernel.sketch_lse(rows, q, 0.2)
    q8, qs = sketch.sketch_query(q)
    for r, ps in enumerate(rows):
        k = sketch.untiled(torch.cat([k for k, _ in ps])).double() - sketch.OFFSET
        ks = torch.cat([s for _, s in ps]).double()
        dots = torch.einsum("nhbd,hgd->hgnb", k, q8[r].double())
        want = torch.logsumexp(dots * ks.permute(1, 0, 2)[:, None] * qs[r].double()[..., None, None] * 0.2, -1)
        torch.testing.assert_close(got[r, ..., : want.shape[-1]].double(), want, atol=5e-5, rtol=1e-5)
        assert torch.isinf(got[r, ..., want.shape[-1] :]).all()


@needs_vnni
def test_8_bit_scores_and_the_selection_are_the_same_either_way_and_near_the_exact_mass(monkeypatch):
    """attention.sketch_scores_rows through the VNNI pass and through the eager ops (the switch off):
    the same scores to float32 rounding and the same picks (a planted block found); and within the
    rounding of 8 bits of the exact mass's scores."""
    gen = torch.Generator().manual_seed(2)
    keys = [[torch.randn(n, 3, 128, 64, generator=gen).bfloat16() for n in ns] for ns in ((3, 16, 1, 9), (4,))]
    q = torch.randn(2, 9, 64, generator=gen)
    keys[0][1][4, 2] = (q[0, 6:9].mean(0) * 3).bfloat16()  # block 7 of row 0 draws KV head 2's queries
    rows = [[sketch.sketch_keys(p) for p in ps] for ps in keys]
    fast = attention.sketch_scores_rows(q, rows, 0.125)
    exact = attention.mass_scores_rows(q, keys, 0.125)
    assert fast.shape == (2, 3, 29) and torch.isinf(fast[1, :, 4:]).all()
    torch.testing.assert_close(fast[0], exact[0], atol=0.05, rtol=0.02)
    assert fast[0, 2].argmax() == 7 and exact[0, 2].argmax() == 7
    monkeypatch.setenv(mass_kernel.ENV_SWITCH, "0")
    assert not mass_kernel.sketch_usable(3, 128, 64)
    torch.testing.assert_close(fast, attention.sketch_scores_rows(q, rows, 0.125), atol=2e-5, rtol=2e-6)


def test_the_8_bit_pass_declines_shapes_it_is_not_written_for():
    """Blocks that are no multiple of 16 keys, head sizes no multiple of 8, groups over 4: the eager
    ops score those (from keys in key order where a block is no multiple of 16)."""
    assert not any(mass_kernel.sketch_usable(g, B, D) for g, B, D in ((3, 20, 64), (3, 128, 36), (5, 128, 64),
                                                                      (0, 128, 64)))  # fmt: skip
    keys = torch.randn(3, 2, 20, 36, generator=torch.Generator().manual_seed(4))
    k8, ks = sketch.sketch_keys(keys)
    assert torch.equal(k8, sketch.untiled(k8)) and torch.equal(k8.float() - 128, torch.round(keys / ks[..., None]))
    q = torch.randn(2, 3, 36)
    q8, qs = sketch.sketch_query(q)
    want = torch.logsumexp(torch.einsum("nhbd,hgd->hgnb", torch.round(keys / ks[..., None]).double(), q8.double())
                           * ks.permute(1, 0, 2)[:, None].double() * qs.double()[..., None, None] * 0.5, -1)  # fmt: skip
    torch.testing.assert_close(sketch.block_lse_eager(q8, qs, [(k8[:1], ks[:1]), (k8[1:], ks[1:])], 0.5).double(), want)


def test_tiles_hold_each_key_by_four_channels_and_come_back():
    k = torch.arange(2 * 32 * 8).view(2, 32, 8)
    t = sketch.tiled(k)
    assert t.shape == k.shape and torch.equal(sketch.untiled(t), k)
    flat = t.flatten()  # block 0's first tile: channels 0-3 of keys 0..15, then channels 4-7 of keys 0..15
    assert flat[:8].tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and flat[64:68].tolist() == [4, 5, 6, 7]
    assert flat[128:132].tolist() == k[0, 16, :4].tolist()  # the next tile


@needs_vnni
def test_the_8_bit_pass_rounds_the_query_as_sketch_query_does():
    """The pass rounds the float query itself: ties to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0),
    where rounding away from zero would move the dot products by whole keys' channels."""
    gen = torch.Generator().manual_seed(9)
    rows = sketched_rows([[2]], 1, 16, 64, seed=9)
    q = torch.randn(1, 1, 2, 64, generator=gen)
    q[0, 0, 0] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] * 8)  # its scale is 1: halves stay halves
    q8, qs = sketch.sketch_query(q)
    assert qs[0, 0, 0] == 1 and q8[0, 0, 0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 4]
    want = sketch.block_lse_eager(q8[0], qs[0], rows[0], 0.2)
    torch.testing.assert_close(mass_kernel.sketch_lse(rows, q, 0.2)[0], want, atol=1e-5, rtol=1e-6)
    away = q8[0].clone()  # halves rounded away from zero instead
    away[0, 0, :8] = torch.tensor([127, 1, 2, 3, -1, -2, -3, 4], dtype=torch.int8)
    assert not torch.allclose(sketch.block_lse_eager(away, qs[0], rows[0], 0.2), want, atol=1e-3)


@pytest.mark.parametrize("score", ["mass", pytest.param("mass_int8", marks=needs_vnni)])
def test_the_passes_selection_is_the_eager_ops_ranking(score, monkeypatch):
    """mass_kernel.select (scoring and ranking in one pass, through a table the store memo'd) picks
    what the eager ops' scores and attention._top_k_rows pick: rows of several chunks, a row of no
    more blocks than k, a row whose blocks all tie (the lower blocks win), the rest zeros."""
    monkeypatch.setattr(topk_store, "CHUNK_TOKENS", 5 * 16)  # chunks of 5 blocks of 16
    store = topk_store.HostStore(int8=score == "mass_int8")
    gen = torch.Generator().manual_seed(3)
    stops, first, k, Hkv, B, D = {"long": 23, "short": 6, "few": 4, "ties": 9}, 2, 3, 2, 16, 64
    for rid, stop in stops.items():
        keys, values = (torch.randn(stop, B, Hkv, D, generator=gen).bfloat16() for _ in range(2))
        if rid == "ties":
            keys = keys[:1].expand_as(keys).clone()
        store.put(rid, 0, 0, keys, values, keys[:, 0].float(), keys[:, 0].float())
    rows = list(stops.items())
    q_caps = torch.randn(len(rows), 3 * Hkv, D, generator=gen)
    cfg = LminfConfig(0, 32, 32, topk_blocks=k, topk_score=score)
    got = attention.select_stored_rows(store, rows, 0, q_caps, first, cfg, 0.125)
    assert store.memo((score, first), 0, rows, lambda: None) is not None  # (the pass's table, memo'd)
    monkeypatch.setenv(mass_kernel.ENV_SWITCH, "0")
    read = store.sketch_at_zero if score == "mass_int8" else store.keys_at_zero
    pieces = [read(rid, 0, first, stop) for rid, stop in rows]
    scores = (attention.sketch_scores_rows if score == "mass_int8" else attention.mass_scores_rows)(q_caps, pieces, 0.125)
    want = attention._top_k_rows(scores, [stop - first for _, stop in rows], first, k)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    assert got[2].tolist() == [[2, 3]] * Hkv and got[3].tolist() == [[2, 3, 4]] * Hkv
