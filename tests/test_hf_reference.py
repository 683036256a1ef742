"""The family-agnostic oracle (transformers model + Λ-attention hook) against the Llama one."""

import pytest
import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.testing.hf_reference import HFLambdaReference, lambda_attention
from lminf_vllm.testing.reference import DenseLlama, dense_lambda_attention
from lminf_vllm.rope import RotarySpec, cos_sin, default_inv_freq, rotate


@pytest.mark.parametrize("cfg", [LminfConfig(3, 5, 9), LminfConfig(0, 7, 7), LminfConfig(10, 4, 6), LminfConfig(2, 1, 1)])
@pytest.mark.parametrize(
    "rotary_dim, neox, scaling", [(8, True, 1.0), (8, False, 1.0), (4, True, 1.0), (4, False, 1.3)], ids=["neox", "pairs", "partial", "pairs-partial-mscale"]
)
def test_hook_attention_equals_dense_reference(cfg, rotary_dim, neox, scaling):
    """Re-rotating pre-rotated queries per global key == rotating at explicit positions."""
    torch.manual_seed(0)
    n, H, Hkv, D = 33, 4, 2, 8
    q, k, v = (torch.randn(n, h, D, dtype=torch.float64) * 2 for h in (H, Hkv, Hkv))
    rotary = RotarySpec(default_inv_freq(100.0, rotary_dim), rotary_dim, neox, scaling)
    expected = dense_lambda_attention(q, k, v, cfg, rotary, D**-0.5)
    # what a model hands the hook: q and k rotated at 0..n-1, cos/sin scaled
    cos, sin = cos_sin(torch.arange(n), rotary.inv_freq, torch.float64)
    q_rot, k_rot = (rotate(x, cos[:, None] * scaling, sin[:, None] * scaling, rotary) for x in (q, k))
    got = lambda_attention(q_rot.transpose(0, 1)[None], k_rot.transpose(0, 1)[None], v.transpose(0, 1)[None], cfg, rotary, D**-0.5)
    torch.testing.assert_close(got[0], expected, atol=1e-12, rtol=0)


def test_hook_on_llama_equals_dense_llama(tiny_llama):
    ids = torch.randint(1, 290, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    hook, dense = HFLambdaReference(tiny_llama), DenseLlama(tiny_llama)
    torch.testing.assert_close(hook.rotary.inv_freq, dense.rotary.inv_freq, atol=0, rtol=0)
    for cfg in (LminfConfig(4, 64, 96), LminfConfig(0, 48, 48)):
        # transformers' RMSNorm runs in float32 even in a float64 model: about 1e-6 apart
        torch.testing.assert_close(hook.prompt_logprobs(ids, cfg), dense.prompt_logprobs(ids, cfg), atol=2e-5, rtol=0)


def test_hook_on_scaled_llama_equals_dense_llama(tmp_path):
    """yarn: scaled frequencies and mscale on cos/sin, derived apart by the two oracles."""
    from lminf_vllm.testing.tiny_models import build_llama

    rope = dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=64, rope_theta=10000.0)
    model = build_llama(tmp_path / "yarn", max_position_embeddings=128, rope_parameters=rope, seed=4)
    ids = torch.randint(1, 290, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    hook, dense = HFLambdaReference(model), DenseLlama(model)
    assert hook.rotary.attention_scaling == dense.rotary.attention_scaling > 1.05
    cfg = LminfConfig(4, 48, 64)
    torch.testing.assert_close(hook.prompt_logprobs(ids, cfg), dense.prompt_logprobs(ids, cfg), atol=2e-5, rtol=0)


@pytest.mark.parametrize("cfg", [LminfConfig(3, 5, 9), LminfConfig(2, 1, 1), LminfConfig(0, 7, 7)])
def test_hook_alibi_follows_spec_wording(cfg):
    """ALiBi: score - m * d over the visible keys, d capped for global keys past the window."""
    torch.manual_seed(1)
    n, H, D = 21, 4, 8
    q, k, v = (torch.randn(1, H, n, D, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    got = lambda_attention(q, k, v, cfg, None, 0.3, slopes)[0]  # [n, H, D]
    for i in range(n):
        keys = [j for j in range(i + 1) if j < cfg.global_tokens or i - j < cfg.local_tokens]
        d = torch.tensor([i - j if i - j < cfg.local_tokens else min(i - j, cfg.distance_cap) for j in keys], dtype=torch.float64)
        for h in range(H):
            scores = (q[0, h, i] * k[0, h, keys]).sum(-1) * 0.3 - slopes[h] * d
            expected = torch.softmax(scores, 0) @ v[0, h, keys]
            torch.testing.assert_close(got[i, h], expected, atol=1e-12, rtol=0)
