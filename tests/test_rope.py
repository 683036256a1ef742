"""rope.rotate on its own, and the RoPE table the engine really uses against an independent computation."""

import math

import pytest
import torch

from conftest import TABLE
from lminf_vllm.rope import RotarySpec, cos_sin, default_inv_freq, rotate


@pytest.mark.parametrize("neox", [True, False])
def test_partial_rotary_broadcasts_like_full_loop(neox):
    """x [T, 1, D] rotated by angles [T, K]: the pass-through features are
    copied to every key, and each slice equals rotating x by that angle alone."""
    D, rot = 16, 8
    spec = RotarySpec(default_inv_freq(100.0, rot), rot, neox)
    x = torch.randn(3, 1, D, dtype=torch.float64)
    angles = torch.tensor([[0, -5, 7], [2, 3, -1000], [1, 1, 1]])
    cos, sin = cos_sin(angles, spec.inv_freq, torch.float64)
    out = rotate(x, cos, sin, spec)  # [3, 3, D]
    assert out.shape == (3, 3, D)
    for t in range(3):
        for k in range(3):
            torch.testing.assert_close(out[t, k], rotate(x[t, 0], cos[t, k], sin[t, k], spec))
    torch.testing.assert_close(out[..., rot:], x[..., rot:].expand(3, 3, D - rot))


def rope_rows_by_hand(positions, inv_freq, scaling=1.0) -> torch.Tensor:
    """[len(positions), 2F] cat(cos, sin) * scaling, element by element with Python's math in float64."""
    freqs = [float(f) for f in inv_freq]
    rows = [[math.cos(p * f) * scaling for f in freqs] + [math.sin(p * f) * scaling for f in freqs] for p in positions]
    return torch.tensor(rows, dtype=torch.float64)


def sample_positions(table: int, rows: int, count: int = 48) -> list[int]:
    """Both edges of the stock table, the last row, and random positions past the table."""
    g = torch.Generator().manual_seed(7)
    picked = torch.randint(table, rows, (count,), generator=g).tolist()
    return sorted({0, 1, table - 1, table, table + 1, rows - 1, *picked})


def test_engine_rope_table_equals_an_independent_computation(tiny_llama):
    """The cos/sin rows the engine's rotary op reads for a step's positions, against cos/sin
    worked out here from the model's base and head size (nothing from lminf_vllm.rope)."""
    from engine import engine, lminf_options, worker_model

    base, dim, rows = 10000.0, 32, 50_000  # the tiny model's rope_theta and head size; rows = max_model_len
    positions = sample_positions(TABLE, rows)
    with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=rows) as llm:
        rope = worker_model(llm).model.layers[0].self_attn.rotary_emb
        got, index = rope.step_cos_sin(torch.tensor(positions), torch.float32)
    assert got.shape == (len(positions), dim) and index.tolist() == list(range(len(positions)))
    got = got.double()
    # the model's own inverse frequencies, formed in float32 as transformers and vLLM do
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    expected = rope_rows_by_hand(positions, inv_freq)
    tail = torch.tensor(positions) >= TABLE
    # past the stock table: float64 angles then a cast, so float32 rounding only, even at 5e4
    torch.testing.assert_close(got[tail], expected[tail], atol=1e-6, rtol=0)
    # the stock rows (vLLM's float32 angles) agree to that arithmetic's own error
    torch.testing.assert_close(got[~tail], expected[~tail], atol=1e-5, rtol=0)


def test_step_rows_follow_positions_rewritten_in_place():
    """The rows kept for the latest positions are matched by value: vLLM rewrites its
    positions buffer in place through numpy (no version bump), same tensor, same shape."""
    from lminf_vllm.rope import StepCosSin, cos_sin_table, default_inv_freq

    inv_freq = default_inv_freq(10000.0, 32)
    step = StepCosSin(cos_sin_table(0, TABLE, inv_freq).float(), inv_freq)
    positions = torch.tensor([3, TABLE + 5, 70_000])
    first, _ = step(positions, torch.float32)
    assert step(positions, torch.float32)[0] is first  # the same step's next layer: kept rows
    positions.numpy()[:] = [4, TABLE + 6, 70_001]
    again, _ = step(positions, torch.float32)
    torch.testing.assert_close(again.double(), cos_sin_table(0, 70_002, inv_freq)[[4, TABLE + 6, 70_001]], atol=1e-6, rtol=0)
    assert step(positions, torch.float64)[0].dtype == torch.float64  # another dtype: formed again
