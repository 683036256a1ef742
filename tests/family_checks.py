"""The three checks every supported model family passes through the real engine.

1. n <= W: lminf equals vLLM's stock CPU backend (greedy tokens, prompt logprobs).
2. prompts up to 8x the RoPE table: prompt logprobs equal the family's dense reference.
3. greedy decoding past the table: finite, and every token the reference's argmax.
A reference is any object with `logits(tokens, cfg)` and `prompt_logprobs(tokens, cfg)`.
"""

import torch
from vllm import SamplingParams

from engine import engine, lminf_options, prompt_logprobs, random_prompt, sample_logprobs, worker_model
from lminf_vllm.config import LminfConfig


def impl_names(llm) -> set[str]:
    """Class names of the attention impls the worker really runs."""
    from vllm.model_executor.layers.attention import Attention

    return {type(m.impl).__name__ for m in worker_model(llm).modules() if isinstance(m, Attention)}


def rotary_specs(llm) -> list:
    """The RotarySpec bound to each lminf attention layer."""
    from vllm.model_executor.layers.attention import Attention

    return [m.impl.rotary for m in worker_model(llm).modules() if isinstance(m, Attention)]


def check_family(model, reference, table: int, cfg: LminfConfig, decode_tokens: int = 80) -> dict:
    """All three checks, on one stock and one lminf engine; returns the largest differences."""
    gen = 8
    short = [random_prompt(n, seed=n) for n in (2, 17, cfg.local_tokens - gen)]  # n + gen <= W
    long = [random_prompt(n, seed=n) for n in (table // 2 + 3, 8 * table)]
    start = random_prompt(table - 16, seed=7)  # decoding crosses the table's end early
    short_params = SamplingParams(max_tokens=gen, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    long_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    decode_params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, logprobs=0, ignore_eos=True)

    def run(llm, prompts, params):
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    with engine(model, backend="CPU_ATTN", max_model_len=table) as llm:
        assert impl_names(llm) == {"CPUAttentionBackendImpl"}
        stock = run(llm, short, short_params)
    options = lminf_options(cfg.global_tokens, cfg.local_tokens, cfg.distance_cap)
    with engine(model, lminf=options, max_model_len=16 * table, max_num_batched_tokens=96, max_num_seqs=4) as llm:
        assert impl_names(llm) == {"LminfAttentionImpl"}
        ours = run(llm, short, short_params)
        outs = run(llm, long, long_params)
        completion = run(llm, [start], decode_params)[0].outputs[0]
        specs = rotary_specs(llm)

    worst = {"stock": 0.0, "prompt": 0.0, "decode": 0.0, "specs": specs}
    # 1. n <= W: the stock backend's tokens and logprobs
    for s, o, prompt in zip(stock, ours, short):
        assert list(o.outputs[0].token_ids) == list(s.outputs[0].token_ids)
        got, expected = prompt_logprobs(o, prompt), prompt_logprobs(s, prompt)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        worst["stock"] = max(worst["stock"], (got - expected).abs().max().item())
    # 2. up to 8x the table: the dense reference's prompt logprobs
    for out, prompt in zip(outs, long):
        got, expected = prompt_logprobs(out, prompt), reference.prompt_logprobs(prompt, cfg)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=0, msg=lambda m: f"n={len(prompt)}: {m}")
        worst["prompt"] = max(worst["prompt"], (got - expected).abs().max().item())
    # the model is sensitive to the distance: without the cap the reference moves far beyond 1e-3
    no_cap = LminfConfig(cfg.global_tokens, cfg.local_tokens, 10**9)
    worst["cap_effect"] = (reference.prompt_logprobs(long[-1], no_cap) - expected).abs().max().item()
    assert worst["cap_effect"] > 0.05
    # 3. greedy decoding past the table: the reference's argmax, finite logprobs
    tokens = start + list(completion.token_ids)
    assert len(tokens) - table >= 64  # generated tokens well past the RoPE table
    logp = torch.log_softmax(reference.logits(tokens, cfg), dim=-1)[len(start) - 1 : -1]
    chosen = logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    got = sample_logprobs(completion)
    assert torch.isfinite(got).all()
    assert (logp.max(dim=1).values - chosen).max() < 1e-3  # every greedy token is the reference's argmax
    torch.testing.assert_close(got, chosen, atol=1e-3, rtol=0)
    worst["decode"] = (got - chosen).abs().max().item()
    return worst
