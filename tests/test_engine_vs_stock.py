"""n <= W: lminf through the real engine equals vLLM's stock CPU backend."""

import torch
from vllm import SamplingParams

from engine import engine, lminf_options, prompt_logprobs, random_prompt, worker_model


def run(model, backend, prompts, **kw):
    params = SamplingParams(max_tokens=24, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    with engine(model, backend=backend, max_model_len=128, **kw) as llm:
        if backend == "lminf":
            impl = worker_model(llm).model.layers[0].self_attn.attn.impl
            assert type(impl).__name__ == "LminfAttentionImpl"  # what the worker really runs
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, prompt_logprobs(o, p)) for o, p in zip(outs, prompts)]


def test_short_sequences_equal_stock_backend(tiny_llama):
    prompts = [random_prompt(n, seed=n) for n in (2, 17, 64, 100)]  # n + 24 <= W = 128
    stock = run(tiny_llama, "CPU_ATTN", prompts)
    ours = run(tiny_llama, "lminf", prompts, lminf=lminf_options(global_tokens=4, local_tokens=128))
    for (tok_s, lp_s), (tok_o, lp_o) in zip(stock, ours):
        assert list(tok_o) == list(tok_s)
        torch.testing.assert_close(lp_o, lp_s, atol=1e-4, rtol=0)
