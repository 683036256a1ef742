"""Seeded sampling survives chunked prefill on CPU and does not depend on the chunking.

Without patch_worker_gpu_model_runner the first chunked seeded request kills
the engine ("CPU Generator does not use offset"). The fix acts in lminf
engines; a stock engine keeps vLLM's behaviour unless its user opts in.
"""

import pytest
from vllm import SamplingParams

from engine import engine, lminf_options, random_prompt
from lminf_vllm.runtime_patches.patch_worker_gpu_model_runner import OPT_IN_ENV


def sample(model, step_tokens, prompts, backend="lminf", max_model_len=2048, max_tokens=60):
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s, ignore_eos=True) for s in range(len(prompts))]
    lminf = lminf_options(4, 64) if backend == "lminf" else None
    with engine(model, backend, lminf=lminf, max_model_len=max_model_len, max_num_batched_tokens=step_tokens) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_seeded_requests_with_chunked_prefill_complete_and_match_unchunked(tiny_llama):
    prompts = [random_prompt(n, seed=n) for n in (700, 90, 400)]
    chunked = sample(tiny_llama, 64, prompts)  # every prompt split into many chunks
    whole = sample(tiny_llama, 2048, prompts)  # each prompt in one step
    assert chunked == whole
    assert all(len(t) == 60 for t in chunked)


def test_a_stock_engine_gets_the_fix_only_on_request(tiny_llama, monkeypatch):
    # stock attention stops at the model's 128 positions: prompts of 70 in chunks of 32
    prompts = [random_prompt(70, seed=7), random_prompt(50, seed=5)]
    stock = dict(backend="CPU_ATTN", max_model_len=128, max_tokens=20)
    monkeypatch.setenv(OPT_IN_ENV, "1")
    chunked = sample(tiny_llama, 32, prompts, **stock)
    assert chunked == sample(tiny_llama, 128, prompts, **stock)
    monkeypatch.delenv(OPT_IN_ENV)
    # not asked for: vLLM's own CPU behaviour, untouched by the plugin
    with pytest.raises(Exception, match="CPU Generator does not use offset"):
        sample(tiny_llama, 32, prompts, **stock)
