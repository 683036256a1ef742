"""Every architecture model_support.py accepts is held to the reference here."""

import pytest
import torch
from vllm import SamplingParams

from engine import engine, lminf_options, prompt_logprobs, random_prompt
from lminf_vllm.config import LminfConfig
from lminf_vllm.model_support import SUPPORTED_ARCHITECTURES
from lminf_vllm.reference import DenseLlama
from lminf_vllm.tiny_models import build_llama

FAMILIES = {
    "LlamaForCausalLM": dict(architecture="llama"),
    "MistralForCausalLM": dict(architecture="mistral", sliding_window=None),
    "Qwen2ForCausalLM": dict(architecture="qwen2", use_sliding_window=False),  # q/k/v carry biases
}


def test_every_supported_architecture_is_covered():
    assert set(FAMILIES) == set(SUPPORTED_ARCHITECTURES)


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
