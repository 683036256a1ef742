"""The engine `make serve` starts, defaults included, against stock vLLM and the dense reference.

`make serve` passes only the backend, `{"lminf": {"global_tokens": 10}}` and a
long max_model_len; everything else is vLLM's default: dtype auto (bfloat16 on a CPU
with bfloat16 instructions, float32 without: lminf_vllm/cpu_isa.py), vLLM's default
block size, torch.compile and chunked prefill on. Here the
same options on the tiny test model (a table of 128 positions, so W = C = 128):
inside the window the result must equal the stock backend's; past it the
float64 dense reference within bfloat16's precision, and clearly closer to it
than to a wrong Λ (no global tokens), so the check can fail.
"""

import pytest
import torch
from vllm import SamplingParams

from conftest import TABLE
from engine import engine, prompt_logprobs, random_prompt
from lminf_vllm.config import LminfConfig
from lminf_vllm.cpu_isa import native_bfloat16
from lminf_vllm.testing.reference import DenseLlama

SERVE_LMINF = {"lminf": {"global_tokens": 10}}  # the Makefile's LMINF_CONFIG
DEFAULTS = dict(dtype="auto", enforce_eager=False, block_size=None)
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=0, ignore_eos=True)


def generate(model, backend, prompts, **options):
    with engine(model, backend=backend, **{**DEFAULTS, **options}) as llm:
        config = llm.llm_engine.vllm_config
        used = (config.model_config.dtype, config.cache_config.block_size, config.compilation_config.mode)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    return used, [(list(o.outputs[0].token_ids), prompt_logprobs(o, p)) for o, p in zip(outs, prompts)]


@pytest.fixture(scope="module")
def lminf_run(tiny_llama):
    short = [random_prompt(n, seed=n) for n in (5, 60, 119)]  # n + 8 <= W = 128
    long = [random_prompt(n, seed=n) for n in (300, 8 * TABLE)]
    used, outs = generate(tiny_llama, "lminf", short + long, lminf=SERVE_LMINF, max_model_len=16 * TABLE)
    return used, short, outs[: len(short)], long, outs[len(short) :]


def test_the_defaults_are_what_users_start(lminf_run):
    (dtype, block_size, compile_mode), *_ = lminf_run
    assert dtype == (torch.bfloat16 if native_bfloat16() else torch.float32) and block_size == 128
    assert compile_mode is not None and int(compile_mode) > 0  # torch.compile on


def test_inside_the_window_equals_stock(tiny_llama, lminf_run):
    (dtype, *_), short, ours, _, _ = lminf_run
    # Stock stops at the table; it gets the dtype lminf's auto chose (they differ without bfloat16 instructions).
    _, stock = generate(tiny_llama, "CPU_ATTN", short, max_model_len=TABLE, dtype=str(dtype).removeprefix("torch."))
    for (tok_o, lp_o), (tok_s, lp_s) in zip(ours, stock):
        assert tok_o == tok_s
        torch.testing.assert_close(lp_o, lp_s, atol=1e-6, rtol=0)  # the same kernel calls: bit for bit


def test_past_the_window_matches_the_reference_to_bfloat16_precision(tiny_llama, lminf_run):
    _, short, short_outs, long, ours = lminf_run
    reference = DenseLlama(tiny_llama)
    C = TABLE
    right, wrong = LminfConfig(10, C, C), LminfConfig(0, C, C)
    # bfloat16's own error: the same engine inside the window, where Λ is plain causal attention
    noise = torch.cat([(got - reference.prompt_logprobs(p, right)).abs() for p, (_, got) in zip(short, short_outs)])
    for prompt, (_, got) in zip(long, ours):
        err = (got - reference.prompt_logprobs(prompt, right)).abs()[C:]  # past the window
        off = (got - reference.prompt_logprobs(prompt, wrong)).abs()[C:]
        q99 = lambda x: x.quantile(0.99).item()  # noqa: E731
        print(f"n={len(prompt)}: error past the window mean {err.mean():.4f} p99 {q99(err):.3f} max {err.max():.3f}; "
              f"inside mean {noise.mean():.4f} p99 {q99(noise):.3f} max {noise.max():.3f}; "
              f"vs a wrong Λ mean {off.mean():.4f}")  # fmt: skip
        # Tails compared at a quantile: a maximum grows with the sample (184 positions inside, up to 896 past).
        assert err.mean() < 2 * noise.mean() and q99(err) < 2 * q99(noise)
        assert err.mean() < 0.25 * off.mean()
