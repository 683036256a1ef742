"""The top-k engine path's parts below the engine: the host store (paths/topk/store.HostStore), block
summaries and the per-chunk selection (topk_attention), held to the dense reference of
docs/topk-contract.md (testing/topk_reference.py). No engine, no vLLM."""

import pytest
import torch

from helpers import HostStore, select_blocks
from lminf_vllm.paths.topk import sketch, store as topk_store
from lminf_vllm.config import LminfConfig
from lminf_vllm.rope import RotarySpec, cos_sin, default_inv_freq, rotate
from lminf_vllm.testing import topk_reference as ref
from lminf_vllm.paths.topk.attention import (
    block_summaries,
    rotations,
    select_from_bounds,
    select_from_mass,
    select_decode_rows,
    select_stored,
    select_stored_rows,
)

B, HKV, D = 4, 2, 8


def blocks(n, seed, dtype=torch.float32):
    """n blocks of keys, values [n, B, Hkv, D] and summaries [n, Hkv, D], all distinct."""
    g = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(n, B, HKV, D, generator=g).to(dtype) for _ in range(2))
    lo, hi = keys.float().amin(1), keys.float().amax(1)
    return keys, values, lo, hi


def rope(D=D, neox=True, rotary_dim=None, scaling=1.0):
    rd = rotary_dim or D
    return RotarySpec(default_inv_freq(100.0, rd), rd, neox, scaling)


ROPES = [rope(), rope(neox=False, rotary_dim=6, scaling=1.3)]


def stored_keys(k0, rotary, first=0):
    """k0 [n, Hkv, D] as vLLM's cache holds them: rotated at their positions first.., with the
    model's cos/sin (which carry attention_scaling)."""
    pos = torch.arange(first, first + k0.shape[0])
    cos, sin = (t * rotary.attention_scaling for t in cos_sin(pos, rotary.inv_freq, k0.dtype))
    return rotate(k0, cos[:, None], sin[:, None], rotary)


# ---------------------------------------------------------------- HostStore


def test_put_then_append_keeps_blocks_in_order():
    store = HostStore()
    z, v, lo, hi = blocks(5, seed=0)  # z stands for the keys rotated back to position 0
    assert store.blocks("r", 1) == 0 and store.requests() == set()
    store.put("r", 1, 2, z[:2], v[:2], lo[:2], hi[:2])  # a request's first put: its first middle block
    assert store.blocks("r", 1) == 4
    store.put("r", 1, 4, z[2:3], v[2:3], lo[2:3], hi[2:3])  # the next completed block
    assert store.blocks("r", 1) == 5
    s_lo, s_hi = store.summaries("r", 1, 2, 5)
    assert torch.equal(s_lo, lo[:3]) and torch.equal(s_hi, hi[:3])
    assert s_lo.dtype == torch.float32
    chosen = torch.tensor([[2, 4], [3, 4]])
    at_zero, values = store.gather("r", 1, chosen)
    assert at_zero.shape == (HKV, 2 * B, D)
    assert torch.equal(at_zero[0], torch.cat((z[0, :, 0], z[2, :, 0])))
    assert torch.equal(at_zero[1], torch.cat((z[1, :, 1], z[2, :, 1])))
    assert torch.equal(values[1], torch.cat((v[1, :, 1], v[2, :, 1])))
    assert store.requests() == {"r"} and store.blocks("r", 2) == 0  # layers are separate
    z, v, lo, hi = blocks(6, seed=4)
    store.put("r", 0, 0, z, v, lo, hi)
    [view] = store.keys_at_zero("r", 0, 1, 5)  # one chunk: one piece
    assert view.shape == (4, HKV, B, D) and torch.equal(view, z[1:5].transpose(1, 2))
    assert view.data_ptr() == store._entries[("r", 0)].keys[0][1].data_ptr()  # in place: a view, no copy
    assert view.is_contiguous()  # the keys apart from the values: one piece per block
    with pytest.raises(RuntimeError, match="never stored"):
        store.keys_at_zero("r", 0, 1, 7)
    q3 = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    for name, want in (("mass", select_from_mass(q3, view, 1, 2, 0.25)),
                       ("bound", select_blocks(q3, lo[1:5], hi[1:5], 1, 2))):  # fmt: skip
        cfg = LminfConfig(0, 4, 4, 2, name)
        assert torch.equal(select_stored(store, "r", 0, q3, 1, 5, cfg, 0.25), want)


def test_growth_in_chunks_keeps_what_was_stored_and_reads_across_chunks(monkeypatch):
    """Chunks of 3 blocks here: growing allocates the next chunk and copies nothing; every read
    (summaries, keys at 0, gathers, block-heads) is the same across a chunk's edge as within one."""
    monkeypatch.setattr(topk_store, "CHUNK_TOKENS", 3 * B)
    store = HostStore()
    z, v, lo, hi = blocks(40, seed=1)
    held = []
    for b in range(40):
        store.put("r", 0, 3 + b, z[b : b + 1], v[b : b + 1], lo[b : b + 1], hi[b : b + 1])
        if b == 0:
            first = store._entries[("r", 0)].keys[0]
        held.append(store.nbytes())
    assert store.blocks("r", 0) == 43 and store.chunks("r", 0) == 15  # ceil(43 / 3)
    assert store._entries[("r", 0)].keys[0] is first  # never copied
    assert held[-1] == topk_store.request_bytes(43 * B, 1, B, HKV, D, 4)  # float32 here
    assert held == [topk_store.request_bytes((4 + b) * B, 1, B, HKV, D, 4) for b in range(40)]
    s_lo, s_hi = store.summaries("r", 0, 3, 43)
    assert torch.equal(s_lo, lo) and torch.equal(s_hi, hi)
    pieces = store.keys_at_zero("r", 0, 4, 11)  # blocks 4, 5 | 6, 7, 8 | 9, 10
    assert [p.shape[0] for p in pieces] == [2, 3, 2]
    assert torch.equal(torch.cat(pieces), z[1:8].transpose(1, 2))
    q = torch.randn(4, D, generator=torch.Generator().manual_seed(5))
    assert torch.equal(select_from_mass(q, pieces, 4, 2, 0.3), select_from_mass(q, torch.cat(pieces), 4, 2, 0.3))
    bounds = store.bounds("r", 0, 4, 11)
    assert [b.shape[-1] for b in bounds] == [2, 3, 2]
    assert torch.equal(select_from_bounds(q, bounds, 4, 2), select_from_bounds(q, torch.cat(bounds, -1), 4, 2))
    chosen = torch.tensor([[3, 42, 7], [20, 21, 22]])  # chunk 1 and 14; 6, 7 (one chunk)
    at_zero, values = store.gather("r", 0, chosen)
    assert torch.equal(at_zero[0, :B], z[0, :, 0]) and torch.equal(at_zero[0, B : 2 * B], z[39, :, 0])
    assert torch.equal(values[1, :B], v[17, :, 1]) and torch.equal(values[1, 2 * B :], v[19, :, 1])
    one_chunk = store.gather("r", 0, torch.tensor([[6], [7]]))[0]
    assert torch.equal(one_chunk[1], z[4, :, 1])
    keys, values = store.block_heads("r", 0, torch.tensor([42 * HKV + 1, 3 * HKV, 8 * HKV]))  # across chunks
    assert torch.equal(keys, torch.stack((z[39, :, 1], z[0, :, 0], z[5, :, 0])))
    assert torch.equal(values, torch.stack((v[39, :, 1], v[0, :, 0], v[5, :, 0])))


def test_a_sketching_store_keeps_the_keys_8_bit_copy_across_chunks_and_counts_its_bytes(monkeypatch):
    """topk_score "mass_int8": beside each key at position 0, its 8-bit copy (sketch.sketch_keys of
    the key as stored, in the cache dtype), read across a chunk's edge as within one; the bytes held
    are request_bytes(int8=True) at every step, dropped with the request; the selection from it is
    the 8-bit reference's."""
    monkeypatch.setattr(topk_store, "CHUNK_TOKENS", 3 * B)
    store = HostStore(int8=True)
    z, v, lo, hi = blocks(8, seed=11, dtype=torch.bfloat16)
    for b in range(8):
        store.put("r", 0, 2 + b, z[b : b + 1].float(), v[b : b + 1], lo[b : b + 1], hi[b : b + 1])
        assert store.nbytes() == topk_store.request_bytes((3 + b) * B, 1, B, HKV, D, 2, int8=True)
    assert topk_store.request_bytes(10 * B, 1, B, HKV, D, 2, int8=True) - topk_store.request_bytes(
        10 * B, 1, B, HKV, D, 2) == 4 * 3 * B * HKV * (D + 4)  # 4 chunks of 3 blocks: a byte a channel, a scale a key
    pieces = store.sketch_at_zero("r", 0, 3, 10)  # blocks 3, 4, 5 | 6, 7, 8 | 9
    assert [k.shape[0] for k, _ in pieces] == [3, 3, 1] and all(k.dtype == torch.uint8 for k, _ in pieces)
    k8, ks = sketch.sketch_keys(z[1:8].transpose(1, 2))
    assert torch.equal(torch.cat([k for k, _ in pieces]), k8) and torch.equal(torch.cat([s for _, s in pieces]), ks)
    q = torch.randn(4, D, generator=torch.Generator().manual_seed(6))
    cfg = LminfConfig(0, 4, 4, 2, "mass_int8")
    want = ref.block_mass_shares(q[None].double(), z.double().view(-1, HKV, D), B, range(1, 8), ref.RotarySpec(
        torch.zeros(D // 2), D, True, 1.0), 0.3, int8=True)[0]  # (a rotation of angle 0: the keys as given)
    best = want.view(HKV, 2, -1).amax(1)[:, 1:8].topk(2, dim=-1).indices.sort(-1).values + 3
    assert torch.equal(select_stored(store, "r", 0, q, 3, 10, cfg, 0.3), best)
    store.drop(["r"])
    assert store.nbytes() == 0


def test_the_cache_dtype_is_kept():
    store = HostStore()
    z, v, lo, hi = blocks(2, seed=2, dtype=torch.bfloat16)
    store.put("r", 0, 0, z.float() / 2, v, lo, hi)  # keys at position 0 come in float32
    at_zero, values = store.gather("r", 0, torch.tensor([[1], [0]]))
    assert at_zero.dtype == values.dtype == torch.bfloat16
    assert torch.equal(at_zero[0], z[1, :, 0] / 2) and torch.equal(values[1], v[0, :, 1])
    assert store.summaries("r", 0, 0, 2)[0].dtype == torch.float32


def test_a_recomputed_request_overwrites_and_forgets_later_blocks(monkeypatch):
    monkeypatch.setattr(topk_store, "CHUNK_TOKENS", 2 * B)  # chunks of 2 blocks: the later ones go
    store = HostStore()
    z, v, lo, hi = blocks(4, seed=3)
    z2, v2, lo2, hi2 = blocks(1, seed=4)
    store.put("r", 0, 1, z, v, lo, hi)  # blocks 1 .. 4
    assert store.chunks("r", 0) == 3
    store.put("r", 0, 2, z2, v2, lo2, hi2)  # computed again up to block 2
    assert store.blocks("r", 0) == 3 and store.chunks("r", 0) == 2
    assert store.nbytes() == topk_store.request_bytes(3 * B, 1, B, HKV, D, 4)
    s_lo, s_hi = store.summaries("r", 0, 1, 3)
    assert torch.equal(s_lo, torch.cat((lo[:1], lo2))) and torch.equal(s_hi, torch.cat((hi[:1], hi2)))
    at_zero, _ = store.gather("r", 0, torch.tensor([[2], [1]]))
    assert torch.equal(at_zero[0], z2[0, :, 0]) and torch.equal(at_zero[1], z[0, :, 1])
    with pytest.raises(RuntimeError, match=r"block 3 of r was never stored"):
        store.summaries("r", 0, 1, 4)
    store.put("r", 0, 3, z[2:], v[2:], lo[2:], hi[2:])  # and goes on from there
    assert store.blocks("r", 0) == 5


def test_a_gap_is_an_error():
    store = HostStore()
    z, v, lo, hi = blocks(3, seed=5)
    store.put("r", 0, 2, z[:2], v[:2], lo[:2], hi[:2])  # blocks 2, 3
    with pytest.raises(RuntimeError, match=r"top-k host store: block 5 of r follows block 3"):
        store.put("r", 0, 5, z[2:], v[2:], lo[2:], hi[2:])
    assert store.blocks("r", 0) == 4  # unchanged
    with pytest.raises(RuntimeError, match=r"block 4 of r was never stored"):
        store.summaries("r", 0, 2, 5)


def test_drop_forgets_every_layer_of_finished_requests():
    store = HostStore()
    z, v, lo, hi = blocks(2, seed=6)
    for request in ("a", "b"):
        for layer in ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"):
            store.put(request, layer, 1, z, v, lo, hi)
    full = store.nbytes()
    assert full == 4 * topk_store.request_bytes(3 * B, 1, B, HKV, D, 4) and store.requests() == {"a", "b"}
    store.drop([])
    store.drop(frozenset({"never-seen"}))
    assert store.requests() == {"a", "b"} and store.nbytes() == full
    store.drop(frozenset({"a"}))
    assert store.requests() == {"b"} and store.nbytes() == full // 2
    assert store.blocks("a", "model.layers.0.self_attn.attn") == 0
    assert store.blocks("b", "model.layers.1.self_attn.attn") == 3
    with pytest.raises(KeyError):
        store.summaries("a", "model.layers.0.self_attn.attn", 1, 2)
    store.drop(["b"])
    assert store.requests() == set() and store.nbytes() == 0


def test_a_put_past_the_limit_is_an_error_naming_the_setting(monkeypatch):
    monkeypatch.setattr(topk_store, "CHUNK_TOKENS", 2 * B)
    store = HostStore()
    store.limit = topk_store.request_bytes(4 * B, 1, B, HKV, D, 4)  # two chunks
    z, v, lo, hi = blocks(5, seed=7)
    store.put("r", 0, 0, z[:4], v[:4], lo[:4], hi[:4])
    with pytest.raises(RuntimeError, match=r"topk_store_max_bytes = \d+"):
        store.put("r", 0, 4, z[4:], v[4:], lo[4:], hi[4:])
    assert store.nbytes() == store.limit and store.blocks("r", 0) == 4


# ---------------------------------------------------------------- block summaries


@pytest.mark.parametrize("rotary", ROPES, ids=["neox", "gptj-partial-scaled"])
@pytest.mark.parametrize("first", [0, 3, 250])
def test_summaries_are_of_the_keys_rotated_back_to_position_zero(rotary, first):
    n = 5
    g = torch.Generator().manual_seed(first)
    k0 = torch.randn(n * B, HKV, D, generator=g, dtype=torch.float64) * 2
    keys = stored_keys(k0, rotary, first * B).float().view(n, B, HKV, D)
    lo, hi, keys_at_zero = block_summaries(keys, first, rotary)
    assert lo.shape == hi.shape == (n, HKV, D) and lo.dtype == torch.float32
    assert keys_at_zero.shape == (n, B, HKV, D) and keys_at_zero.dtype == torch.float32
    # keys at position 0: the un-rotated keys (their rotary channels times the table's scaling,
    # as the reference has them)
    at_zero = ref.keys_at_zero(k0, rotary).view(n, B, HKV, D)
    if rotary.attention_scaling == 1.0:
        assert torch.equal(at_zero, k0.view(n, B, HKV, D))
    torch.testing.assert_close(keys_at_zero.double(), at_zero, atol=1e-5, rtol=1e-5)
    assert torch.equal(lo, keys_at_zero.amin(1)) and torch.equal(hi, keys_at_zero.amax(1))
    torch.testing.assert_close(lo.double(), at_zero.amin(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hi.double(), at_zero.amax(1), atol=1e-5, rtol=1e-5)
    r_lo, r_hi = ref.key_summaries(torch.cat((torch.zeros(first * B, HKV, D, dtype=k0.dtype), k0)), B, rotary)
    torch.testing.assert_close(lo.double(), r_lo[first:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hi.double(), r_hi[first:], atol=1e-5, rtol=1e-5)
    # every key of a block lies between its lo and hi, channel by channel
    assert (lo[:, None] <= at_zero.float() + 1e-5).all() and (at_zero.float() <= hi[:, None] + 1e-5).all()
    assert (lo <= hi).all()


# ---------------------------------------------------------------- the selection


SCALE = 0.3  # the softmax scale the mass is taken at


def engine_selection(q0, k0, e, cfg, blk, k, rotary, score="mass"):
    """The engine's selection for the chunk ending at e (helpers.select_blocks for the bound,
    select_from_mass for the mass), from what the engine holds: the summaries or the keys at
    position 0 of the stored (rotated) keys, and the last row's query as stored (rotated at
    e - 1) moved to position C by the engine's own rotation matrix."""
    g, f = ref.global_block_count(cfg, blk), ref.first_window_block(e - 1, cfg, blk)
    keys = stored_keys(k0, rotary).float()[g * blk : f * blk].view(f - g, blk, *k0.shape[1:])
    lo, hi, at_zero = block_summaries(keys, g, rotary)
    q_last = stored_keys(q0[e - 1 : e], rotary, e - 1).float()[0]  # [H, D]
    q_cap = q_last @ rotations(torch.tensor([cfg.distance_cap - (e - 1)]), rotary, q0.shape[-1])[0]
    torch.testing.assert_close(q_cap.double(), ref.query_at_cap(q0[e - 1], cfg, rotary), atol=1e-4, rtol=1e-4)
    if score == "bound":
        return select_blocks(q_cap, lo, hi, g, k)
    return select_from_mass(q_cap, at_zero.transpose(1, 2), g, k, SCALE)  # as HostStore.keys_at_zero lays them


def reference_scores(q0, k0, e, cfg, blk, rotary, score):
    """The reference's per-head scores of every full block for the chunk ending at e: [1, H, nb]."""
    q_cap = ref.query_at_cap(q0[e - 1 : e], cfg, rotary)
    if score == "bound":
        return ref.block_bounds(q_cap, *ref.key_summaries(k0, blk, rotary))
    return ref.block_mass_shares(q_cap, k0, blk, ref.middle_blocks(e - 1, cfg, blk), rotary, SCALE)


@pytest.mark.parametrize("score", ["mass", "bound"])
@pytest.mark.parametrize("rotary", ROPES, ids=["neox", "gptj-partial-scaled"])
@pytest.mark.parametrize("G, W, C, blk, k", [(3, 9, 12, 4, 2), (0, 8, 8, 4, 1), (8, 6, 30, 8, 4), (5, 16, 40, 2, 3)])
def test_select_blocks_is_the_references_choice(rotary, G, W, C, blk, k, score):
    """Random data, several chunk ends: the same blocks as the reference's select_blocks over
    its scores (float32 against float64: a pick may differ only on a near-tie; the mass is
    compared as the log of the share)."""
    n, H = 120, 4
    g = torch.Generator().manual_seed(G * 100 + W)
    q0, k0 = (torch.randn(n, h, D, generator=g, dtype=torch.float64) * 2 for h in (H, HKV))
    cfg = LminfConfig(G, W, C)
    exact = 0
    for e in range(1, n + 1):
        cand = ref.middle_blocks(e - 1, cfg, blk)
        if not cand:
            continue
        got = engine_selection(q0, k0, e, cfg, blk, k, rotary, score)
        scores = reference_scores(q0, k0, e, cfg, blk, rotary, score)
        want = ref.select_blocks(scores, e - 1, cfg, blk, k, HKV)
        assert got.shape == (HKV, min(k, len(cand)))
        if got.tolist() == want:
            exact += 1
            continue
        best = scores[0].view(HKV, H // HKV, -1).amax(1)  # the group's max
        if score == "mass":
            best = best.log()
        for h in range(HKV):
            kth = best[h, cand.start : cand.stop].topk(got.shape[1]).values[-1]
            assert (kth - best[h, got[h]]).max() < 1e-4 * (1 + kth.abs()), (e, h, got[h].tolist(), want[h])
    assert exact >= 0.95 * sum(bool(ref.middle_blocks(e - 1, cfg, blk)) for e in range(1, n + 1))


def test_ties_go_to_the_lower_block():
    """Equal bounds: the lower block wins, as in the reference."""
    cfg = LminfConfig(0, 4, 4)
    q_cap = torch.randn(2, D, generator=torch.Generator().manual_seed(7))  # 2 heads, one KV head
    lo = torch.zeros(9, 1, D)
    hi = torch.zeros(9, 1, D)
    lo[7, 0] = hi[7, 0] = q_cap[0]  # block 7 scores |q|^2 > 0, the other eight 0
    got = select_blocks(q_cap, lo, hi, 0, 3)
    assert got.tolist() == [[0, 1, 7]]
    bounds = torch.zeros(1, 2, 10)
    bounds[0, :, 7] = 1.0
    assert ref.select_blocks(bounds, 40, cfg, 4, 3, 1) == got.tolist()
    # with the first blocks offset (global blocks before them): numbers are absolute
    assert select_blocks(q_cap, lo, hi, 5, 2).tolist() == [[5, 12]]
    # k above the candidates: all of them, ascending
    assert select_blocks(q_cap, lo[:3], hi[:3], 2, 10).tolist() == [[2, 3, 4]]
    # per KV head: each its own choice, from its own group's max
    q2 = torch.zeros(4, D)
    q2[1, 0] = q2[2, 1] = 1.0  # KV head 0 is read by query heads 0, 1; KV head 1 by 2, 3
    lo2 = torch.zeros(4, 2, D)
    lo2[2, 0, 0] = lo2[1, 1, 1] = lo2[3, 1, 1] = 1.0
    assert select_blocks(q2, lo2, lo2.clone(), 10, 1).tolist() == [[12], [11]]


def test_mass_ties_go_to_the_lower_block():
    """The mass score: equal shares, the lower block wins, as in the reference; a block is scored
    by all its keys (one matching key in a block of B is worth less than B matching keys)."""
    q_cap = torch.zeros(2, D)  # 2 heads, one KV head
    q_cap[0, 0] = 3.0
    at_zero = torch.zeros(9, 1, B, D)  # [nc, Hkv, B, D] as HostStore.keys_at_zero lays them out
    at_zero[7, 0, :, 0] = 1.0  # block 7: every key matches head 0's query
    assert select_from_mass(q_cap, at_zero, 0, 3, 0.5).tolist() == [[0, 1, 7]]
    assert select_from_mass(q_cap, at_zero, 5, 2, 0.5).tolist() == [[5, 12]]  # numbers are absolute
    assert select_from_mass(q_cap, at_zero[:3], 2, 10, 0.5).tolist() == [[2, 3, 4]]  # k above the candidates
    at_zero[3, 0, 0, 0] = 1.0  # block 3: one matching key of B
    assert select_from_mass(q_cap, at_zero, 0, 1, 0.5).tolist() == [[7]]
    assert select_from_mass(q_cap, at_zero, 0, 2, 0.5).tolist() == [[3, 7]]
    # per KV head: each its own choice, from the max of its group's shares (not of raw scores:
    # head 1's scores are all 0, yet its share of block 1 beats head 0's of block 2)
    q2 = torch.zeros(4, D)
    q2[0, 0], q2[2, 1] = 0.5, 4.0
    z2 = torch.zeros(4, 2, B, D)
    z2[2, 0, :, 0] = 1.0  # KV head 0: block 2 matches head 0 a little
    z2[1, 1, :, 1] = 1.0  # KV head 1: block 1 matches head 2 a lot
    assert select_from_mass(q2, z2, 10, 1, 1.0).tolist() == [[12], [11]]


@pytest.mark.parametrize("score", ["mass", "bound"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_steps_rows_select_as_each_row_alone(score, dtype, monkeypatch):
    """select_stored_rows (a decode step's rows of one layer, one ranking for all) chooses what
    select_stored chooses for each row alone: rows of different lengths, across the store's
    chunks, one with no more candidates than k, one whose blocks all tie."""
    monkeypatch.setattr(topk_store, "CHUNK_TOKENS", 5 * B)  # chunks of 5 blocks
    cfg, first = LminfConfig(0, 8, 8, topk_blocks=3, topk_score=score), 2
    store = HostStore()
    stops = {"long": 41, "short": 9, "few": first + 2, "ties": 12}
    for n, (rid, stop) in enumerate(stops.items()):
        keys, values, lo, hi = blocks(stop, n, dtype)
        if rid == "ties":  # every block the same: the lowest blocks win
            keys, values, lo, hi = (t[:1].expand_as(t).clone() for t in (keys, values, lo, hi))
        store.put(rid, "layer", 0, keys, values, lo, hi)
    rows = list(stops.items())
    q_caps = torch.randn(len(rows), 2 * HKV, D, generator=torch.Generator().manual_seed(5))
    got = select_stored_rows(store, rows, "layer", q_caps, first, cfg, SCALE)
    for (rid, stop), q_cap, picks in zip(rows, q_caps, got):
        want = select_stored(store, rid, "layer", q_cap, first, stop, cfg, SCALE)
        assert torch.equal(picks, want), (rid, picks.tolist(), want.tolist())
    assert got[2].tolist() == [[2, 3]] * HKV and got[3].tolist() == [[2, 3, 4]] * HKV


def test_decode_rows_keep_a_selection_for_topk_refresh_positions_and_forget_it_when_computed_again():
    """select_decode_rows: a row scores, the rows up to R - 1 positions after it read its picks
    (whatever their own query), the row R positions after scores again; a row with more middle
    blocks than the kept picks hold scores at once; a request computed again keeps nothing."""
    cfg, first = LminfConfig(0, 8, 8, topk_blocks=2, topk_refresh=4), 2
    store = HostStore()
    keys, values, lo, hi = blocks(20, 0)
    store.put("r", "layer", 0, keys, values, lo, hi)
    g = torch.Generator().manual_seed(9)
    q = lambda: torch.randn(1, 2 * HKV, D, generator=g)  # noqa: E731
    own = lambda i, stop, q_cap: select_stored(store, "r", "layer", q_cap[0], first, stop, cfg, SCALE)  # noqa: E731
    q_cap = q()
    scored = select_decode_rows(store, [("r", 12, 100)], "layer", q_cap, first, cfg, SCALE)[0]
    assert torch.equal(scored, own(100, 12, q_cap)) and store.kept("r", "layer")[0] == 100
    differs = False
    for i in (101, 102, 103):
        q_cap = q()
        got = select_decode_rows(store, [("r", 12, i)], "layer", q_cap, first, cfg, SCALE)[0]
        assert got is scored  # kept, not scored
        differs |= not torch.equal(got, own(i, 12, q_cap))
    assert differs  # the later queries would have chosen otherwise: keeping is not scoring
    q_cap = q()
    again = select_decode_rows(store, [("r", 12, 104)], "layer", q_cap, first, cfg, SCALE)[0]
    assert torch.equal(again, own(104, 12, q_cap)) and store.kept("r", "layer")[0] == 104
    # a selection of one block (one candidate) is scored again once a second block may be read
    store.keep("r", "layer", 105, torch.tensor([[2]] * HKV))
    q_cap = q()
    grown = select_decode_rows(store, [("r", 4, 106)], "layer", q_cap, first, cfg, SCALE)[0]
    assert grown.shape == (HKV, 2) and torch.equal(grown, own(106, 4, q_cap))
    store.put("r", "layer", 0, keys[:3], values[:3], lo[:3], hi[:3])  # computed again from its first block
    assert store.kept("r", "layer") is None


def test_bounds_and_gather_far_lay_out_what_was_stored():
    """bounds: hi's channels then lo's, a column per block; gather_far: keys at position 0 and values
    of any blocks per KV head; block_heads: both, per block and KV head."""
    store = HostStore()
    z, v, lo, hi = blocks(6, seed=3)
    store.put("r", 0, 0, z, v, lo, hi)
    [m] = store.bounds("r", 0, 1, 5)  # one chunk: one piece
    assert m.shape == (HKV, 2 * D, 4)
    assert torch.equal(m[:, :D].permute(2, 0, 1), hi[1:5]) and torch.equal(m[:, D:].permute(2, 0, 1), lo[1:5])
    chosen = torch.tensor([[0, 5, 2], [4, 4, 1]])
    at_zero, values = store.gather_far("r", 0, chosen)
    assert torch.equal(at_zero[1, B : 2 * B], z[4, :, 1]) and torch.equal(values[0, 2 * B :], v[2, :, 0])
    keys, values = store.block_heads("r", 0, torch.tensor([4 * HKV + 1]))  # a (block, KV head): keys at 0, values
    assert torch.equal(keys[0], z[4, :, 1]) and torch.equal(values[0], v[4, :, 1])


# ---------------------------------------------------------------- the decode way


DECODE_CASES = [(3, 16, 16, 4, 2, 57), (5, 12, 20, 4, 3, 70), (0, 8, 8, 8, 1, 41), (10, 16, 40, 4, 2, 66)]


def decode_case(dtype, G, W, C, blk, k, i, with_table=False):
    """A decode row at i past the first middle block: a pool of shuffled physical blocks, the
    store of its complete blocks, a random selection. -> (the chunk way's output [H, Dv], the
    arguments of the decode way: q, q_cap, DecodeRow, cache, far, far_blocks, cfg; the store;
    with_table: the row's block table too)."""
    from lminf_vllm.kv_layout import OWN_LAYOUT
    from lminf_vllm.paths.topk.attention import attend_chunk, decodes_fast, plan_chunk, plan_decode

    rotary, H, n = ROPES[1], 4, i + 1
    cfg = LminfConfig(G, W, C, k)
    assert decodes_fast(i, cfg, blk)
    gen = torch.Generator().manual_seed(i)
    k0, v0 = (torch.randn(n, HKV, D, generator=gen) for _ in range(2))
    nb = n // blk + 1
    table = torch.randperm(nb + 3, generator=gen)[:nb] + 1  # physical ids; 0 stays the null block
    cache = torch.zeros(nb + 4, HKV, blk, 2 * D, dtype=dtype)
    keys = stored_keys(k0.double(), rotary).to(dtype)
    for p in range(n):
        cache[table[p // blk], :, p % blk] = torch.cat((keys[p], v0[p].to(dtype)), dim=-1)
    done = n // blk  # complete blocks, all in the store (the global ones too)
    store = HostStore()
    kb = keys[: done * blk].view(done, blk, HKV, D)
    lo, hi, at_zero = block_summaries(kb, 0, rotary)
    store.put("r", 0, 0, at_zero, v0[: done * blk].to(dtype).view(done, blk, HKV, D), lo, hi)
    q = stored_keys(torch.randn(1, H, D, generator=gen, dtype=torch.float64), rotary, i).to(dtype)
    g = -(-G // blk)
    dec = plan_decode(i, table, cfg, blk, HKV, rotary, D)
    chosen = torch.stack([torch.randperm(dec.fa - g, generator=gen)[:k].sort().values + g for _ in range(HKV)])
    spans = plan_chunk(i, n, table, cfg, blk, rotary, D)
    store_kv = store.gather("r", 0, chosen)
    want = attend_chunk(q, spans, cache, OWN_LAYOUT, chosen, store_kv, cfg, D**-0.5, rotary)[0]
    q_f = q[0].float()
    far_blocks = torch.cat((dec.far_blocks, chosen), dim=1)
    far = store.gather_far("r", 0, far_blocks)
    case = want, (q_f, q_f @ dec.q_cap, dec, cache, far, far_blocks, cfg), store
    return (*case, table) if with_table else case


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)])  # bf16: one ulp at 1
@pytest.mark.parametrize("G, W, C, blk, k, i", DECODE_CASES)
def test_attend_decode_equals_attend_chunk(dtype, atol, G, W, C, blk, k, i):
    """A decode row the short way (window from the pool, everything else from the store at position 0,
    one softmax) against the chunk way (two branches merged), on the same pool, store and selection,
    physical blocks shuffled. bfloat16: P meets V in bfloat16 in the short way only."""
    from lminf_vllm.paths.topk.attention import attend_decode

    want, args, _ = decode_case(dtype, G, W, C, blk, k, i)
    got = attend_decode(*args, D**-0.5, ROPES[1])
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def merge_parts(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """One softmax from any number of parts normalised apart: outs [..., P, Dv], lses [..., P]."""
    return (outs * torch.softmax(lses, dim=-1)[..., None]).sum(dim=-2)


@pytest.mark.parametrize("G, W, C, blk, k, i", DECODE_CASES)
def test_far_part_and_merge_equal_attend_chunk(G, W, C, blk, k, i):
    """The decode way in two parts, as the engine runs it with vLLM's op for the window: the window
    (here in float64) and the store's keys normalised apart, joined by their log-sum-exps."""
    from lminf_vllm.paths.topk.attention import far_part, far_scores, merge_two

    want, (q, q_cap, dec, cache, far, far_blocks, cfg), _ = decode_case(torch.float32, G, W, C, blk, k, i)
    window = cache.view(-1, blk, 2 * D)[dec.window_rows].view(HKV, -1, 2 * D)[:, dec.start : dec.start + W]
    s = torch.einsum("kgd,knd->kgn", q.double().view(HKV, -1, D), window[..., :D].double()) * D**-0.5
    o_w = torch.einsum("kgn,knd->kgd", torch.softmax(s, -1), window[..., D:].double()).reshape(1, -1, 1, D)
    lse_w = torch.logsumexp(s, -1).reshape(1, -1, 1)
    o_f, lse_f = far_part(far_scores(q, q_cap, dec, far, far_blocks, cfg, blk, ROPES[1])[None], far[1][None], D**-0.5)
    got = merge_parts(torch.cat((o_w.float(), o_f[:, :, None]), 2), torch.cat((lse_w.float(), lse_f[..., None]), 2))
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
    two = merge_two(o_w[:, :, 0].float(), lse_w[..., 0].float(), o_f, lse_f)  # the engine's form of two parts
    torch.testing.assert_close(two, got, atol=1e-6, rtol=0)
    # the window part is a part: dropping it changes the answer
    assert (o_f[0] - want).abs().max() > 1e-2


def test_memo_keeps_a_table_while_the_rows_blocks_and_chunks_stay(monkeypatch):
    """HostStore.memo: one make() while every row's (request, stop) and its chunks are unchanged (a
    block added inside the last chunk moves nothing); made again for a new stop, a new chunk, and
    after a drop (a request computed again from 0 has new chunks at the same stop)."""
    monkeypatch.setattr(topk_store, "CHUNK_TOKENS", 3 * B)  # chunks of 3 blocks
    store, made = HostStore(), []
    z, v, lo, hi = blocks(8, seed=2)

    def memo(stop):
        return store.memo("t", 0, [("r", stop)], lambda: made.append(stop) or len(made))

    store.put("r", 0, 0, z[:4], v[:4], lo[:4], hi[:4])  # chunks 0 and 1 (blocks 3, _, _)
    assert memo(4) == memo(4) == 1
    store.put("r", 0, 4, z[4:5], v[4:5], lo[4:5], hi[4:5])  # inside chunk 1
    assert memo(4) == 1 and memo(5) == 2 and memo(5) == 2
    store.put("r", 0, 5, z[5:7], v[5:7], lo[5:7], hi[5:7])  # chunk 2 comes: its addresses are new
    assert memo(5) == 3
    store.drop(["r"])
    store.put("r", 0, 0, z[:5], v[:5], lo[:5], hi[:5])
    assert memo(5) == 4 and made == [4, 5, 5, 5]
    with pytest.raises(RuntimeError, match="never stored"):
        memo(6)
