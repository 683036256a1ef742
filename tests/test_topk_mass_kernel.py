"""The mass score's compiled pass (paths/topk/mass_kernel.py) against its eager formula and float64.

Awkward sizes as the engine meets them: a chunk of one block, KV heads and query groups of one,
head sizes that are not a multiple of the vector width, keys in every cache dtype."""

import pytest
import torch

from lminf_vllm.paths.topk import attention, mass_kernel


def _float64_lse(keys, q, scale):
    s = torch.einsum("nhbd,hgd->nhgb", keys.double(), q.double()) * scale
    return torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n", "Hkv", "g", "B", "D"), [(1, 3, 3, 128, 64), (5, 1, 4, 16, 80), (16, 2, 1, 64, 40),
                                                         (7, 4, 2, 32, 64)])  # fmt: skip
def test_compiled_block_lse_is_the_eager_formula_and_float64s(dtype, n, Hkv, g, B, D):
    gen = torch.Generator().manual_seed(n * 100 + D)
    keys = (torch.randn(n, Hkv, B, D, generator=gen) * 2).to(dtype)
    q = torch.randn(Hkv, g, D, generator=gen)
    fused = mass_kernel.compiled(dtype, Hkv, g, B, D)
    assert fused is not None, "inductor could not compile the mass score on this machine"
    got, eager, want = fused(keys, q, 0.2), mass_kernel.block_lse_eager(keys, q, 0.2), _float64_lse(keys, q, 0.2)
    assert got.shape == eager.shape == (n, Hkv, g) and got.dtype == torch.float32
    torch.testing.assert_close(got, eager, atol=2e-5, rtol=2e-6)
    torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-5)


def test_a_chunk_view_of_the_store_scores_as_a_copy_of_it():
    """The store hands out slices of its chunks (a storage offset); the pass must read from it."""
    gen = torch.Generator().manual_seed(1)
    chunk = torch.randn(16, 3, 128, 64, generator=gen).bfloat16()
    q = torch.randn(3, 3, 64, generator=gen)
    fused = mass_kernel.compiled(torch.bfloat16, 3, 3, 128, 64)
    torch.testing.assert_close(fused(chunk[5:11], q, 0.125), fused(chunk[5:11].clone(), q, 0.125), atol=0, rtol=0)
    torch.testing.assert_close(fused(chunk[5:11], q, 0.125), fused(chunk, q, 0.125)[5:11], atol=1e-6, rtol=0)


def test_mass_scores_and_the_selection_are_the_same_either_way(monkeypatch):
    """attention.mass_scores through the compiled pass and through the eager ops (the switch off),
    pieces of uneven chunks: the same scores to float32 rounding, the same picks (a planted block)."""
    gen = torch.Generator().manual_seed(2)
    pieces = [torch.randn(n, 3, 128, 64, generator=gen).bfloat16() for n in (3, 16, 1, 9)]
    q = torch.randn(9, 64, generator=gen)
    pieces[1][4, 2] = (q[6:9].mean(0) * 3).bfloat16()  # block 7 draws KV head 2's queries
    fast = attention.mass_scores(q, pieces, 0.125)
    picks = attention.select_from_mass(q, pieces, 10, 4, 0.125)
    monkeypatch.setenv(mass_kernel.ENV_SWITCH, "0")
    assert mass_kernel.compiled(torch.bfloat16, 3, 3, 128, 64) is None
    torch.testing.assert_close(fast, attention.mass_scores(q, pieces, 0.125), atol=2e-5, rtol=2e-6)
    assert torch.equal(picks, attention.select_from_mass(q, pieces, 10, 4, 0.125))
    assert 10 + 7 in picks[2].tolist()
