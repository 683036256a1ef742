"""A whole prefill chunk of top-k attention (paths/topk/attention.attend_chunk) held to the dense
reference (testing/topk_reference.dense_topk_attention) on the same selection: chunks past the
window and the cap, where C = W (the short far branch: keys at position 0 against the queries at
C, the window through vLLM's kernel or PyTorch's) and where C > W (the general far branch),
physical blocks shuffled, float32 and bfloat16 caches. No engine."""

import pytest
import torch

from helpers import HostStore
from lminf_vllm.config import LminfConfig
from lminf_vllm.kv_layout import OWN_LAYOUT
from lminf_vllm.paths.topk.attention import attend_chunk, block_summaries, plan_chunk
from lminf_vllm.paths.topk.window import plan_window
from lminf_vllm.rope import RotarySpec, cos_sin, default_inv_freq, rotate
from lminf_vllm.testing.topk_reference import dense_topk_attention

HKV, H, D = 2, 6, 16


def at_positions(x, rotary, first=0):
    pos = torch.arange(first, first + x.shape[0])
    cos, sin = (t * rotary.attention_scaling for t in cos_sin(pos, rotary.inv_freq, x.dtype))
    return rotate(x, cos[:, None], sin[:, None], rotary)


def chunk_case(dtype, G, W, C, blk, k, s, e, rotary, kernel, seed=0):
    """Rows [s, e) of a sequence of e tokens, as the engine runs them: the pool holds every block
    (shuffled physical ids), the store every block complete at e, a random selection among the
    chunk's middle blocks; the window branch through vLLM's kernel or PyTorch's attention.
    -> (attend_chunk's output [T, H, D], the reference's in float64, the spans)."""
    cfg = LminfConfig(G, W, C, k)
    gen = torch.Generator().manual_seed(seed)
    q0, k0, v = (torch.randn(e, n, D, generator=gen, dtype=torch.float64) for n in (H, HKV, HKV))
    nb = -(-e // blk)
    table = torch.randperm(nb + 3, generator=gen)[:nb] + 1
    cache = torch.zeros(nb + 4, HKV, blk, 2 * D, dtype=dtype)
    keys = at_positions(k0, rotary).to(dtype)
    for p in range(e):
        cache[table[p // blk], :, p % blk] = torch.cat((keys[p], v[p].to(dtype)), dim=-1)
    done = e // blk
    store = HostStore()
    lo, hi, zero = block_summaries(keys[: done * blk].view(done, blk, HKV, D), 0, rotary)
    store.put("r", 0, 0, zero, v[: done * blk].to(dtype).view(done, blk, HKV, D), lo, hi)
    g, f = -(-G // blk), max(0, e - 1 - W + 1) // blk
    assert f - g > k, "the case must select"
    chosen = torch.stack([torch.randperm(f - g, generator=gen)[:k].sort().values + g for _ in range(HKV)])
    spans = plan_chunk(s, e, table, cfg, blk, rotary, D)
    q = at_positions(q0[s:e], rotary, s).to(dtype)
    window = plan_window(s, e, table, W, blk, H, HKV, D, dtype) if kernel else None
    assert (window is not None) == kernel, "vLLM's kernel serves these sizes"
    got = attend_chunk(q, spans, cache, OWN_LAYOUT, chosen, store.gather("r", 0, chosen), cfg, D**-0.5, rotary, window)
    selection = [(0, s, [[] for _ in range(HKV)]), (s, e, [c.tolist() for c in chosen])]
    want = dense_topk_attention(q0, k0, v.to(dtype).double(), cfg, rotary, D**-0.5, topk=k, block_size=blk,
                                selection=selection)[s:e]  # fmt: skip
    return got, want, spans


ROPES = [RotarySpec(default_inv_freq(100.0, D), D, True), RotarySpec(default_inv_freq(100.0, 12), 12, False, 1.3)]
CASES = [  # G, W, C, B, k, s, e: C = W takes the short far branch past the global blocks
    (4, 32, 32, 8, 2, 40, 200),
    (10, 48, 48, 16, 3, 0, 260),  # from position 0: rows before the window, the first rows past it
    (0, 32, 32, 16, 2, 130, 211),  # no global tokens
    (20, 40, 40, 8, 4, 97, 300),  # global blocks and edge not aligned to the chunk
    (4, 32, 64, 8, 2, 60, 230),  # C > W: the general far branch
]


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-window", "pytorch-window"])
@pytest.mark.parametrize("rotary", ROPES, ids=["neox", "partial-interleaved-scaled"])
@pytest.mark.parametrize("G, W, C, blk, k, s, e", CASES)
def test_a_chunk_equals_the_dense_reference(rotary, G, W, C, blk, k, s, e, kernel):
    got, want, spans = chunk_case(torch.float32, G, W, C, blk, k, s, e, rotary, kernel)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    assert any(sp.short for sp in spans) == (C == W)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-window", "pytorch-window"])
@pytest.mark.parametrize("G, W, C, blk, k, s, e", CASES[:2] + CASES[-1:])
def test_a_bfloat16_chunk_equals_the_dense_reference_to_its_rounding(G, W, C, blk, k, s, e, kernel):
    got, want, _ = chunk_case(torch.bfloat16, G, W, C, blk, k, s, e, ROPES[0], kernel)
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=0)
