"""Bounded KV memory: a sequence keeps its global blocks and its window, nothing else.

Pools here are a few dozen blocks of 32 tokens; the engines allow max_model_len
of 1,000,000 on them.
"""

import os
import subprocess
import sys

import pytest
import torch
from vllm import SamplingParams

from engine import (
    engine, held_blocks, kv_manager, lminf_options, page_bytes, prompt_logprobs, random_prompt, sample_logprobs,
)  # fmt: skip
from lminf_vllm.block_policy import max_blocks_per_sequence
from lminf_vllm.config import LminfConfig
from lminf_vllm.testing.reference import DenseLlama

G, W, C, B = 4, 64, 128, 32
CFG = LminfConfig(G, W, C)
STEP = 256  # max_num_batched_tokens
MILLION = 1_000_000


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return DenseLlama(tiny_llama)


def small_engine(model, pool_blocks, **kw):
    options = dict(
        lminf=lminf_options(G, W, C), max_model_len=MILLION, kv_cache_memory_bytes=pool_blocks * page_bytes(),
        max_num_batched_tokens=STEP,
    )  # fmt: skip
    options.update(kw)
    return engine(model, **options)


def test_3000_token_prompt_and_200_tokens_in_24_blocks(tiny_llama, reference):
    prompt = random_prompt(3000, seed=1)
    params = SamplingParams(max_tokens=200, temperature=0.0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
    with small_engine(tiny_llama, 24) as llm:
        manager = kv_manager(llm)
        assert manager.block_pool.num_gpu_blocks == 24
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert manager.num_freed_blocks >= (3200 // B) - 4  # the middle went back to the pool
    completion = out.outputs[0]
    assert len(completion.token_ids) == 200
    torch.testing.assert_close(prompt_logprobs(out, prompt), reference.prompt_logprobs(prompt, CFG), atol=1e-3, rtol=0)
    tokens = prompt + list(completion.token_ids)
    logp = torch.log_softmax(reference.logits(tokens, CFG), dim=-1)[len(prompt) - 1 : -1]
    expected = logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(sample_logprobs(completion), expected, atol=1e-3, rtol=0)


def test_stock_backend_cannot_run_it_in_that_pool(tiny_llama):
    """Full attention keeps every block: 3,200 tokens need 100 blocks, not 24."""
    code = f"""
import os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM
LLM(model={str(tiny_llama)!r}, dtype="float32", enforce_eager=True, attention_backend="CPU_ATTN",
    block_size={B}, max_model_len=3200, kv_cache_memory_bytes={24 * page_bytes()})
"""
    env = dict(os.environ, VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")  # only so stock may try at all
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "larger than the available KV cache memory" in result.stderr


def test_blocks_held_never_exceed_the_bound(tiny_llama):
    """Step the engine by hand and read its own KV manager after every step. With topk_blocks = k
    the bound is the same (every middle block a query reads comes from the host store,
    docs/topk-contract.md), and the engine holds exactly what it holds with k = 0."""
    decode_bound = max_blocks_per_sequence(G, W, B)  # ceil(G/B) + ceil(W/B) + 1
    prefill_bound = max_blocks_per_sequence(G, W, B, in_flight_tokens=STEP)
    peaks = []
    for k in (0, 2):
        lminf = {"lminf": {**lminf_options(G, W, C)["lminf"], "topk_blocks": k}}
        with small_engine(tiny_llama, 32, lminf=lminf) as llm:
            manager, core = kv_manager(llm), llm.llm_engine
            core.add_request("long", {"prompt_token_ids": random_prompt(1500, seed=3)},
                             SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True))  # fmt: skip
            peak_prefill = peak_decode = steps = 0
            while core.has_unfinished_requests():
                outputs = core.step()
                steps += 1
                held = max(held_blocks(manager).values(), default=0)  # one request (its id gets a suffix)
                running = list(core.engine_core.engine_core.scheduler.requests.values())
                if running and running[0].num_computed_tokens > running[0].num_prompt_tokens:
                    peak_decode = max(peak_decode, held)
                else:
                    peak_prefill = max(peak_prefill, held)
            assert outputs and len(outputs[0].outputs[0].token_ids) == 600
        assert steps > 600
        assert 0 < peak_decode <= decode_bound, (k, peak_decode, decode_bound)
        assert peak_prefill <= prefill_bound, (k, peak_prefill, prefill_bound)
        peaks.append((peak_prefill, peak_decode))
    assert peaks[0] == peaks[1], peaks


def test_16_concurrent_long_sequences_share_a_small_pool(tiny_llama, reference):
    prompts = [random_prompt(2000 + 37 * i, seed=100 + i) for i in range(16)]
    pool = 16 * max_blocks_per_sequence(G, W, B, in_flight_tokens=STEP)  # the bound for 16 ...
    full = sum((len(p) + 50) // B + 1 for p in prompts)
    assert pool < full / 5  # ... far from 16 full sequences
    params = SamplingParams(max_tokens=50, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    with small_engine(tiny_llama, pool, max_num_seqs=16) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 50 for o in outs)
    for out, prompt in zip(outs, prompts):
        torch.testing.assert_close(prompt_logprobs(out, prompt), reference.prompt_logprobs(prompt, CFG), atol=1e-3, rtol=0)


def generate_tokens(llm, prompts, max_tokens=120):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return outs, [(list(o.outputs[0].token_ids), sample_logprobs(o.outputs[0])) for o in outs]


def test_prefix_caching_on_equals_off_and_reuses_global_and_window_blocks(tiny_llama):
    shared = random_prompt(1200, seed=7)
    first, second = shared + random_prompt(40, seed=8), shared + random_prompt(64, seed=9)
    results = {}
    for caching in (False, True):
        with small_engine(tiny_llama, 40, enable_prefix_caching=caching) as llm:
            _, a = generate_tokens(llm, [first])
            outs, b = generate_tokens(llm, [second])
            results[caching] = a + b
            if caching:
                # the middle of `shared` was freed; its start and window were still cached
                assert outs[0].num_cached_tokens >= 1024
    for (tok_off, lp_off), (tok_on, lp_on) in zip(results[False], results[True]):
        assert tok_on == tok_off
        torch.testing.assert_close(lp_on, lp_off, atol=1e-4, rtol=0)


def test_preemption_under_kv_pressure_returns_the_same_tokens(tiny_llama):
    prompts = [random_prompt(700 + 50 * i, seed=20 + i) for i in range(6)]
    with small_engine(tiny_llama, 200, max_num_batched_tokens=128) as llm:
        _, calm = generate_tokens(llm, prompts, max_tokens=200)
    # 16 blocks with 128-token steps: requests are admitted, then outgrow the
    # pool between their prefill chunks and decode (19 preemptions seen here)
    with small_engine(tiny_llama, 16, max_num_seqs=6, max_num_batched_tokens=128) as llm:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        preempt, preempted = scheduler._preempt_request, []
        scheduler._preempt_request = lambda request, *a, **k: (preempted.append(request.request_id), preempt(request, *a, **k))[1]
        _, pressed = generate_tokens(llm, prompts, max_tokens=200)
    assert preempted, "the pool was meant to force preemption"
    for (tok_calm, lp_calm), (tok_pressed, lp_pressed) in zip(calm, pressed):
        assert tok_pressed == tok_calm
        torch.testing.assert_close(lp_pressed, lp_calm, atol=1e-4, rtol=0)
