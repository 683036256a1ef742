"""Any n: the real engine with lminf equals the dense reference of SPEC.md.

The tiny model has a RoPE table of 128 positions; prompts go to 1024 (8x) and
greedy decoding runs 160 tokens past the table. Chunked prefill is forced small
(chunks that straddle blocks) and prompts of very different lengths share each
batch, so prefill, decode, chunked prefill and mixed batches are all exercised.
"""

import pytest
import torch
from vllm import SamplingParams

from conftest import TABLE
from engine import engine, lminf_options, prompt_logprobs, random_prompt, sample_logprobs
from lminf_vllm.config import LminfConfig
from lminf_vllm.testing.reference import DenseLlama

CASES = [
    # (G, W, C, block size, max tokens per step)
    pytest.param(4, 64, 128, 32, 96, id="G4-W64-C128-B32"),
    pytest.param(0, 96, 96, 16, 80, id="G0-W96-C96-B16-window-only"),
    pytest.param(10, 48, 64, 16, 72, id="G10-W48-C64-B16-G-not-multiple-of-B"),
    pytest.param(5, 128, 128, 64, 200, id="G5-W128-C128-B64"),
]
LENGTHS = (3, 77, 300, 8 * TABLE)  # one short, several long, in one batch


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return DenseLlama(tiny_llama)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the steps vLLM's CPU kernel served (paths/cpu_kernel), per layer call."""
    import lminf_vllm.paths.cpu_kernel as cpu_kernel

    calls = []
    original = cpu_kernel.run_calls

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu_kernel, "run_calls", counting)
    return calls


# On CPU both attention paths: vLLM's kernel (blocks of a multiple of 32 only)
# and PyTorch alone (LMINF_CPU_KERNEL=0).
PATH_CASES = [
    pytest.param(*case.values, path, id=f"{case.id}-{path}")
    for case in CASES
    for path in ("cpu-kernel", "torch")
    if path == "torch" or case.values[3] % 32 == 0
]


@pytest.mark.parametrize("G, W, C, block_size, step_tokens, path", PATH_CASES)
def test_prompt_logprobs_match_reference(
    tiny_llama, reference, G, W, C, block_size, step_tokens, path, kernel_calls, monkeypatch
):
    if path == "torch":
        monkeypatch.setenv("LMINF_CPU_KERNEL", "0")
    cfg = LminfConfig(G, W, C)
    prompts = [random_prompt(n, seed=n + G) for n in LENGTHS]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    with engine(
        tiny_llama,
        lminf=lminf_options(G, W, C),
        block_size=block_size,
        max_model_len=2048,
        max_num_batched_tokens=step_tokens,
        max_num_seqs=4,
    ) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, prompt in zip(outs, prompts):
        got = prompt_logprobs(out, prompt)
        expected = reference.prompt_logprobs(prompt, cfg)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=0, msg=lambda m: f"n={len(prompt)}: {m}")
    assert bool(kernel_calls) == (path == "cpu-kernel")


@pytest.mark.parametrize("path", ["cpu-kernel", "torch"])
def test_greedy_decode_past_the_table_matches_reference(tiny_llama, reference, path, kernel_calls, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("LMINF_CPU_KERNEL", "0")
    G, W, C = 4, 64, 96
    cfg = LminfConfig(G, W, C)
    prompts = [random_prompt(100, seed=11), random_prompt(20, seed=12)]
    params = SamplingParams(max_tokens=300, temperature=0.0, logprobs=0, ignore_eos=True)
    with engine(tiny_llama, lminf=lminf_options(G, W, C), max_model_len=1024, max_num_batched_tokens=64) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, prompt in zip(outs, prompts):
        completion = out.outputs[0]
        tokens = prompt + list(completion.token_ids)
        assert len(tokens) - TABLE >= 150  # 150+ generated tokens past the RoPE table
        logp = torch.log_softmax(reference.logits(tokens, cfg), dim=-1)[len(prompt) - 1 : -1]
        chosen = logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        # every greedy choice is the reference's best token (up to float ties) ...
        assert (logp.max(dim=1).values - chosen).max() < 1e-3
        # ... and its logprob is the reference's
        torch.testing.assert_close(sample_logprobs(completion), chosen, atol=1e-3, rtol=0)
    assert bool(kernel_calls) == (path == "cpu-kernel")
