"""rope.rotate on its own: broadcasting one angle per (query, key) pair."""

import pytest
import torch

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
