"""The oracle itself: dense reference vs a per-query loop, and vs transformers."""

import pytest
import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.testing.reference import DenseLlama, brute_force_lambda_attention, dense_lambda_attention, lambda_mask_and_distance
from lminf_vllm.rope import RotarySpec, default_inv_freq


def test_mask_and_distance_follow_spec_wording():
    cfg = LminfConfig(global_tokens=2, local_tokens=3, distance_cap=4)
    visible, dist = lambda_mask_and_distance(8, cfg)
    # query 7 sees globals 0, 1 and its window 5, 6, 7
    assert visible[7].nonzero().flatten().tolist() == [0, 1, 5, 6, 7]
    assert dist[7, [0, 1, 5, 6, 7]].tolist() == [4, 4, 2, 1, 0]  # 7 and 6 capped at 4
    # query 4: key 1 is global at distance 3 (< cap), key 2 is local
    assert dist[4, 1].item() == 3 and visible[4, 2]
    assert not visible[3, 4]  # causal


@pytest.mark.parametrize("cfg", [LminfConfig(3, 5, 9), LminfConfig(0, 7, 7), LminfConfig(10, 4, 6), LminfConfig(2, 1, 1)])
@pytest.mark.parametrize("neox", [True, False])
def test_dense_equals_per_query_loop(cfg, neox):
    torch.manual_seed(0)
    n, H, Hkv, D = 33, 4, 2, 8
    q, k, v = (torch.randn(n, h, D, dtype=torch.float64) * 2 for h in (H, Hkv, Hkv))
    rotary = RotarySpec(default_inv_freq(100.0, D), D, neox)
    dense = dense_lambda_attention(q, k, v, cfg, rotary, D**-0.5)
    loop = brute_force_lambda_attention(q, k, v, cfg, rotary, D**-0.5)
    torch.testing.assert_close(dense, loop, atol=1e-12, rtol=0)


def test_dense_llama_equals_transformers_when_window_covers_all(tiny_llama):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(1, 290, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    ref = DenseLlama(tiny_llama)
    # n <= W: the Λ-mask is full causal attention
    got = ref.logits(ids, LminfConfig(global_tokens=4, local_tokens=128, distance_cap=128))
    # transformers forms RoPE angles in float32; the reference in float64
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_tiny_model_is_sensitive_to_mask_and_cap(tiny_llama):
    """A wrong mask or distance must move logprobs far beyond the tests' 1e-3."""
    ref = DenseLlama(tiny_llama)
    ids = torch.randint(1, 290, (400,), generator=torch.Generator().manual_seed(2)).tolist()
    lam = ref.prompt_logprobs(ids, LminfConfig(4, 64, 96))
    assert (lam - ref.prompt_logprobs(ids, None)).abs().max() > 0.1  # full attention
    assert (lam - ref.prompt_logprobs(ids, LminfConfig(4, 64, 10**6))).abs().max() > 0.01  # no cap
    assert (lam - ref.prompt_logprobs(ids, LminfConfig(0, 64, 96))).abs().max() > 0.01  # no globals
    assert (lam - ref.prompt_logprobs(ids, LminfConfig(4, 63, 96))).abs().max() > 0.01  # window off by one
