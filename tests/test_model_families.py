"""Every architecture model_support.py accepts is held to a dense reference here.

Llama, Mistral and Qwen2 against DenseLlama; GPT-J (partial, interleaved
pairs), GPT-NeoX and Phi (partial, halves; vLLM runs these two through its
Transformers backend) against the transformers model with Λ-attention hooked
in, by the three checks of family_checks.py; BLOOM (ALiBi) likewise.
"""

import pytest
import torch
from vllm import SamplingParams

from engine import engine, lminf_options, prompt_logprobs, random_prompt
from family_checks import check_family
from lminf_vllm.config import LminfConfig
from lminf_vllm.testing.hf_reference import HFLambdaReference
from lminf_vllm.model_support import SUPPORTED_ARCHITECTURES
from lminf_vllm.testing.reference import DenseLlama
from lminf_vllm.testing.tiny_models import build_family, build_llama

FAMILIES = {
    "LlamaForCausalLM": dict(architecture="llama"),
    "MistralForCausalLM": dict(architecture="mistral", sliding_window=None),
    "Qwen2ForCausalLM": dict(architecture="qwen2", use_sliding_window=False),  # q/k/v carry biases
}


# architecture -> (model_type, rotary width of the head of 32, interleaved pairs)
ROPE_FAMILIES = {
    "GPTJForCausalLM": ("gptj", 16, True),
    "GPTNeoXForCausalLM": ("gpt_neox", 8, False),
    "PhiForCausalLM": ("phi", 16, False),
}


def test_every_supported_architecture_is_covered():
    assert set(FAMILIES) | set(ROPE_FAMILIES) | {"BloomForCausalLM"} == set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(ROPE_FAMILIES))
def test_rope_family_through_the_engine(arch, tmp_path):
    model_type, rotary_dim, interleaved = ROPE_FAMILIES[arch]
    model = build_family(tmp_path / model_type, model_type, max_position_embeddings=128, seed=3)
    reference = HFLambdaReference(model)
    assert (reference.rotary.rotary_dim, reference.rotary.is_neox_style) == (rotary_dim, not interleaved)
    worst = check_family(model, reference, 128, LminfConfig(4, 48, 96))
    for spec in worst["specs"]:  # what lminf read from vLLM's model is transformers' RoPE
        assert (spec.rotary_dim, spec.is_neox_style) == (rotary_dim, not interleaved)
        torch.testing.assert_close(spec.inv_freq, reference.rotary.inv_freq, rtol=1e-6, atol=0)
    print(f"\n{arch}: max |lminf - stock| {worst['stock']:.1e}, |lminf - reference| prompt {worst['prompt']:.1e} decode {worst['decode']:.1e}, cap moves {worst['cap_effect']:.2f}")


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_family_matches_reference_past_the_table(arch, tmp_path):
    model = build_llama(tmp_path / arch, max_position_embeddings=128, seed=3, **FAMILIES[arch])
    cfg = LminfConfig(4, 48, 96)
    prompts = [random_prompt(n, seed=n) for n in (60, 700)]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    with engine(model, lminf=lminf_options(4, 48, 96), max_model_len=1024, max_num_batched_tokens=128) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    reference = DenseLlama(model)
    if arch == "Qwen2ForCausalLM":
        assert any(k.endswith("q_proj.bias") for k in reference.w)  # the biases are really exercised
    for out, prompt in zip(outs, prompts):
        torch.testing.assert_close(prompt_logprobs(out, prompt), reference.prompt_logprobs(prompt, cfg), atol=1e-3, rtol=0)


def test_alibi_family_through_the_engine(tmp_path):
    """BLOOM: no RoPE; the bias -m * d sees the capped distance (it has no table: 128 is nominal)."""
    model = build_family(tmp_path / "bloom", "bloom", seed=3)
    reference = HFLambdaReference(model)
    worst = check_family(model, reference, 128, LminfConfig(4, 48, 96))
    assert all(spec is None for spec in worst["specs"])  # no rotary bound: ALiBi layers
    print(f"\nBloomForCausalLM: max |lminf - stock| {worst['stock']:.1e}, |lminf - reference| prompt {worst['prompt']:.1e} decode {worst['decode']:.1e}, cap moves {worst['cap_effect']:.2f}")
