"""The far keys' C++ pass (paths/topk/far_kernel.py) against float64, on awkward sizes.

Rows of different chunk counts, blocks read whole, in part and not at all, a row that reads
nothing, KV heads and query groups of one, head and value sizes that are no multiple of the
vector width, every cache dtype. (tests/test_topk_window_op.py holds the engine's decode way
built on it to the chunk way; tests/test_topk_engine.py the engine to the oracle.)"""

import pytest
import torch

import helpers

from lminf_vllm.paths.topk import far_kernel


def _stores(gen, chunks, N, Hkv, B, D, Dv, dtype):
    keys = [(torch.randn(N, Hkv, B, D, generator=gen) * 2).to(dtype) for _ in range(chunks)]
    values = [torch.randn(N, Hkv, B, Dv, generator=gen).to(dtype) for _ in range(chunks)]
    return keys, values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("Hkv", "g", "B", "D", "Dv"), [(3, 3, 128, 64, 64), (1, 4, 5, 40, 24), (2, 1, 20, 130, 66),
                                                         (2, 4, 37, 32, 16)])  # fmt: skip
def test_attend_is_float64s_for_every_row_and_head(dtype, Hkv, g, B, D, Dv):
    assert far_kernel.usable(dtype), "the far keys' C++ pass could not be built on this machine"
    gen = torch.Generator().manual_seed(B * 1000 + D)
    N = 4
    rows = [_stores(gen, c, N, Hkv, B, D, Dv, dtype) for c in (1, 3, 2)]
    blocks = torch.stack([torch.randint(0, N * c, (Hkv, 5), generator=gen) for c in (1, 3, 2)])
    counts = torch.tensor([[B, 1, 0, B, B - 1], [0, B, B, 2, B], [0, 0, 0, 0, 0]])  # the last row reads nothing
    q = torch.randn(3, Hkv, g, D, generator=gen)
    bases = [([t.data_ptr() for t in k], [t.data_ptr() for t in v]) for k, v in rows]
    out, lse = far_kernel.attend(far_kernel.base_table(bases), blocks, counts, q, N, B, Dv, dtype, 0.2)
    assert out.shape == (3, Hkv * g, Dv) and lse.shape == (3, Hkv * g) and out.dtype == lse.dtype == torch.float32
    for r in range(2):
        want_out, want_lse = far_kernel.reference(*rows[r], blocks[r], counts[r], q[r], 0.2)
        torch.testing.assert_close(out[r].double(), want_out, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lse[r].double(), want_lse, atol=2e-5, rtol=1e-5)
    assert torch.isinf(lse[2]).all() and (lse[2] < 0).all() and torch.equal(out[2], torch.zeros_like(out[2]))


def test_a_pass_that_cannot_be_built_says_so_and_leaves_pytorch_the_far_keys(monkeypatch, caplog):
    """No compiler, another torch: kernel_ok warns and usable says no (paths/topk then scores the
    keys past the window in PyTorch), instead of failing the engine's step."""
    helpers.unbuildable_pass_warns(far_kernel, monkeypatch, caplog, "far keys' C++ pass is unavailable")
