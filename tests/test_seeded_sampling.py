"""Seeded sampling survives chunked prefill on CPU and does not depend on the chunking.

Without patch_worker_gpu_model_runner the first chunked seeded request kills
the engine ("CPU Generator does not use offset").
"""

from vllm import SamplingParams

from engine import engine, lminf_options, random_prompt


def sample(model, step_tokens, prompts):
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, ignore_eos=True) for s in range(len(prompts))]
    with engine(model, lminf=lminf_options(4, 64), max_model_len=2048, max_num_batched_tokens=step_tokens) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_seeded_requests_with_chunked_prefill_complete_and_match_unchunked(tiny_llama):
    prompts = [random_prompt(n, seed=n) for n in (700, 90, 400)]
    chunked = sample(tiny_llama, 64, prompts)  # every prompt split into many chunks
    whole = sample(tiny_llama, 2048, prompts)  # each prompt in one step
    assert chunked == whole
    assert all(len(t) == 60 for t in chunked)
