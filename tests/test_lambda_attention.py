"""The backend's paged Λ-attention against the dense reference, without an engine.

Awkward sizes on purpose (FlashInfer's habit): lengths 1, 3, 19, 99, 300;
block sizes 1, 16, 32; permuted physical blocks; chunked steps.
"""

import pytest
import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.kv_layout import write_kv
from lminf_vllm.lambda_attention import decode_lambda_attention, paged_lambda_attention, plan_decode
from lminf_vllm.testing.reference import dense_lambda_attention
from lminf_vllm.rope import RotarySpec, cos_sin, default_inv_freq, rotate

H, HKV, D = 4, 2, 16


def make_case(n, block_size, seed, neox=True):
    g = torch.Generator().manual_seed(seed)
    q0, k0, v = (torch.randn(n, h, D, generator=g) * 1.5 for h in (H, HKV, HKV))
    rotary = RotarySpec(default_inv_freq(100.0, D), D, neox)
    cos, sin = cos_sin(torch.arange(n), rotary.inv_freq, torch.float32)
    q = rotate(q0, cos[:, None], sin[:, None], rotary)  # as the model hands them over
    k = rotate(k0, cos[:, None], sin[:, None], rotary)
    n_blocks = -(-n // block_size)
    pool = n_blocks + 7
    block_row = torch.randperm(pool, generator=g)[:n_blocks]  # permuted physical blocks
    kv_cache = torch.full((pool, HKV, block_size, 2 * D), float("nan"))
    return q0, k0, v, q, k, rotary, kv_cache, block_row


def slots_of(block_row, block_size, start, stop):
    pos = torch.arange(start, stop)
    return block_row[pos // block_size] * block_size + pos % block_size


def run_in_steps(q, k, v, kv_cache, block_row, steps, cfg, rotary):
    """Feed the sequence in chunks as the engine would: write, then attend."""
    B = kv_cache.shape[2]
    outs, start = [], 0
    for size in steps:
        stop = start + size
        write_kv(kv_cache, k[start:stop], v[start:stop], slots_of(block_row, B, start, stop))
        outs.append(paged_lambda_attention(q[start:stop], kv_cache, block_row, stop, cfg, D**-0.5, rotary))
        start = stop
    return torch.cat(outs)


CONFIGS = [
    LminfConfig(global_tokens=4, local_tokens=16, distance_cap=32),
    LminfConfig(global_tokens=0, local_tokens=24, distance_cap=24),  # sliding window only
    LminfConfig(global_tokens=10, local_tokens=7, distance_cap=9),  # G not a multiple of B
    LminfConfig(global_tokens=3, local_tokens=40, distance_cap=40),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", ","))
@pytest.mark.parametrize("n", [1, 3, 19, 99, 300])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_prefill_matches_reference(cfg, n, block_size):
    q0, k0, v, q, k, rotary, kv_cache, block_row = make_case(n, block_size, seed=n + block_size)
    out = run_in_steps(q, k, v, kv_cache, block_row, [n], cfg, rotary)
    expected = dense_lambda_attention(q0.double(), k0.double(), v.double(), cfg, rotary, D**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", ","))
@pytest.mark.parametrize("neox", [True, False])
def test_chunked_prefill_then_decode_matches_reference(cfg, neox):
    n, block_size = 613, 16
    q0, k0, v, q, k, rotary, kv_cache, block_row = make_case(n, block_size, seed=7, neox=neox)
    steps = [5, 64, 1, 250, 33, 200] + [1] * 60  # chunks straddling blocks, then decode
    assert sum(steps) == n
    out = run_in_steps(q, k, v, kv_cache, block_row, steps, cfg, rotary)
    expected = dense_lambda_attention(q0.double(), k0.double(), v.double(), cfg, rotary, D**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", ","))
def test_decode_reads_nothing_outside_global_and_window(cfg):
    """Poison every position a decode query must not read: the result stays exact."""
    n, block_size = 200, 16
    q0, k0, v, q, k, rotary, kv_cache, block_row = make_case(n, block_size, seed=3)
    write_kv(kv_cache, k, v, slots_of(block_row, block_size, 0, n))
    i = n - 1
    hidden = [p for p in range(n) if p >= cfg.global_tokens and i - p >= cfg.local_tokens]
    poison = slots_of(block_row, block_size, 0, n)[hidden]
    kv_cache[poison // block_size, :, poison % block_size] = float("nan")
    out = paged_lambda_attention(q[i:], kv_cache, block_row, n, cfg, D**-0.5, rotary)
    expected = dense_lambda_attention(q0.double(), k0.double(), v.double(), cfg, rotary, D**-0.5)[i:]
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", ","))
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("keys_per_group", [1 << 16, 64], ids=["one-group", "split-groups"])
def test_batched_decode_matches_reference_for_mixed_lengths(cfg, block_size, keys_per_group, monkeypatch):
    """Several requests of very different lengths decode in one call; each request's
    positions outside its globals and window are poisoned with NaN."""
    import lminf_vllm.lambda_attention as la

    monkeypatch.setattr(la, "DECODE_KEYS_PER_GROUP", keys_per_group)
    lengths = [1, 2, 9, 40, 150, 333]
    pool = sum(-(-n // block_size) for n in lengths) + 5
    kv_cache = torch.full((pool, HKV, block_size, 2 * D), float("nan"))
    free = torch.randperm(pool, generator=torch.Generator().manual_seed(block_size)).tolist()
    width = max(-(-n // block_size) for n in lengths)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    queries, expected = [], []
    for r, n in enumerate(lengths):
        q0, k0, v, q, k, rotary, _, _ = make_case(n, block_size, seed=r)
        row = torch.tensor([free.pop() for _ in range(-(-n // block_size))])
        table[r, : len(row)] = row
        keep = [p for p in range(n) if p < cfg.global_tokens or n - 1 - p < cfg.local_tokens]
        write_kv(kv_cache, k[keep], v[keep], slots_of(row, block_size, 0, n)[keep])
        queries.append(q[n - 1])
        expected.append(dense_lambda_attention(q0.double(), k0.double(), v.double(), cfg, rotary, D**-0.5)[n - 1])
    plans = plan_decode(torch.tensor(lengths), table, cfg, block_size)
    out = decode_lambda_attention(torch.stack(queries), kv_cache, plans, D**-0.5, rotary)
    torch.testing.assert_close(out.double(), torch.stack(expected), atol=2e-5, rtol=0)
