"""A long prefill does not starve short requests: lminf's default per-step prefill cap.

vLLM's scheduler serves running requests first and a prompt in chunked prefill
takes the whole step budget, so a short request waits for the whole of a long
prefill. lminf engines get `long_prefill_token_threshold` = max_num_batched_tokens
// LONG_PREFILL_SHARE when the user leaves it unset (docs/serving.md, "A long
prompt and short requests"); a user's value is kept and stock engines are untouched.
The configs are vLLM's own (EngineArgs.create_engine_config, as `vllm serve`
makes them); the last test runs a real engine step by step.
"""

import pickle

import pytest
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.usage.usage_lib import UsageContext

from engine import engine, random_prompt
from lminf_vllm.vllm_config import LONG_PREFILL_SHARE

SERVE_BUDGET = 2048  # vLLM's max_num_batched_tokens for `vllm serve` on CPU
LMINF = {"lminf": {"global_tokens": 10}}


def scheduler_config(model, **options):
    args = EngineArgs(model=str(model), max_model_len=options.pop("max_model_len", 4096), enforce_eager=True,
                      **options)  # fmt: skip
    config = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    assert config.scheduler_config.max_num_batched_tokens == options.get("max_num_batched_tokens", SERVE_BUDGET)
    return config


def test_lminf_gets_the_cap_when_unset(tiny_llama):
    config = scheduler_config(tiny_llama, attention_backend="lminf", additional_config=LMINF)
    assert config.scheduler_config.long_prefill_token_threshold == SERVE_BUDGET // LONG_PREFILL_SHARE == 256
    # the engine core and workers get the pickled config: the cap travels with it
    assert pickle.loads(pickle.dumps(config)).scheduler_config.long_prefill_token_threshold == 256


def test_the_cap_follows_the_budget_and_obeys_vllms_rules(tiny_llama):
    config = scheduler_config(tiny_llama, attention_backend="lminf", max_num_batched_tokens=256)
    assert config.scheduler_config.long_prefill_token_threshold == 256 // LONG_PREFILL_SHARE
    # vLLM refuses a cap above max_model_len: the default stays within it
    config = scheduler_config(tiny_llama, attention_backend="lminf", max_model_len=300, max_num_batched_tokens=4096)
    assert config.scheduler_config.long_prefill_token_threshold == 300


@pytest.mark.parametrize("value", [300, SERVE_BUDGET, 100_000])
def test_a_users_value_is_kept(tiny_llama, value):
    config = scheduler_config(tiny_llama, attention_backend="lminf", long_prefill_token_threshold=value,
                              max_model_len=131072)  # fmt: skip
    assert config.scheduler_config.long_prefill_token_threshold == value


@pytest.mark.parametrize("backend", [None, "CPU_ATTN"])
def test_stock_engines_are_unchanged(tiny_llama, backend):
    config = scheduler_config(tiny_llama, attention_backend=backend, max_model_len=128)
    assert config.scheduler_config.long_prefill_token_threshold == 0


def test_no_cap_without_chunked_prefill(tiny_llama):
    config = scheduler_config(tiny_llama, attention_backend="lminf", enable_chunked_prefill=False,
                              max_num_batched_tokens=4096)
    assert config.scheduler_config.long_prefill_token_threshold == 0


def first_tokens(llm, long_prompt, short_prompt):
    """Step the engine: the long prompt alone for one step, then a short one.
    Returns, for each, the step of its first token, and how much of the long
    prompt was computed when the short one's first token came."""
    core = llm.llm_engine
    scheduler = core.engine_core.engine_core.scheduler
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    core.add_request("long", {"prompt_token_ids": long_prompt}, params)
    core.step()
    core.add_request("short", {"prompt_token_ids": short_prompt}, params)
    first, long_done_at_short = {}, None
    for step in range(1, 200):
        for out in core.step():
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = step
                if out.request_id == "short":  # the scheduler's ids carry a suffix
                    long = [r for rid, r in scheduler.requests.items() if rid.startswith("long")]
                    long_done_at_short = long[0].num_computed_tokens if long else None
        if not core.has_unfinished_requests():
            break
    return first, long_done_at_short


def test_a_short_request_is_answered_while_a_long_prompt_prefills(tiny_llama):
    budget, n = 256, 2000  # lone, the long prompt takes 8 steps of the whole budget
    long_prompt, short_prompt = random_prompt(n, seed=1), random_prompt(8, seed=2)
    options = dict(lminf=LMINF, max_model_len=4096, max_num_batched_tokens=budget, max_num_seqs=4)
    with engine(tiny_llama, **options) as llm:
        assert llm.llm_engine.vllm_config.scheduler_config.long_prefill_token_threshold == budget // LONG_PREFILL_SHARE
        first, computed = first_tokens(llm, long_prompt, short_prompt)
    assert first["short"] <= 2 and first["short"] < first["long"]
    assert computed is not None and computed < n  # the long prompt was still prefilling
    # vLLM's behaviour (a cap >= the budget: none): the short request waits for the whole prefill
    with engine(tiny_llama, long_prefill_token_threshold=budget, **options) as llm:
        first, _ = first_tokens(llm, long_prompt, short_prompt)
    assert first["short"] >= first["long"] >= n // budget - 1


# --- the KV cache an lminf engine reserves on CPU when no size is given -----


def test_lminf_reserves_max_num_seqs_times_the_bound_when_no_kv_size_is_given(tiny_llama, monkeypatch):
    from lminf_vllm.block_policy import max_blocks_per_sequence

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cfg = {"lminf": {"global_tokens": 4, "local_tokens": 256, "distance_cap": 256}}
    config = scheduler_config(tiny_llama, attention_backend="lminf", additional_config=cfg, max_num_seqs=8,
                              block_size=32, max_model_len=131072)  # fmt: skip
    model, B = config.model_config, 32
    block_bytes = model.get_num_layers(config.parallel_config) * model.get_num_kv_heads(config.parallel_config) \
        * 2 * model.get_head_size() * B * model.dtype.itemsize
    bound = max_blocks_per_sequence(4, 256, B, in_flight_tokens=SERVE_BUDGET)
    assert config.cache_config.kv_cache_memory_bytes == 8 * bound * block_bytes
    # a size the user gives is kept, and stock engines keep vLLM's default
    sized = scheduler_config(tiny_llama, attention_backend="lminf", additional_config=cfg, max_num_seqs=8,
                             kv_cache_memory_bytes=1 << 30)  # fmt: skip
    assert sized.cache_config.kv_cache_memory_bytes == 1 << 30
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    from_env = scheduler_config(tiny_llama, attention_backend="lminf", additional_config=cfg, max_num_seqs=8)
    assert from_env.cache_config.kv_cache_memory_bytes == 2 << 30
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    stock = scheduler_config(tiny_llama, attention_backend="CPU_ATTN", max_num_seqs=8, max_model_len=128,
                             max_num_batched_tokens=SERVE_BUDGET)
    assert stock.cache_config.kv_cache_memory_bytes is None


def test_lminf_keeps_vllms_default_where_the_product_would_exceed_it(tiny_llama, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    huge = {"lminf": {"global_tokens": 4, "local_tokens": 1 << 22, "distance_cap": 1 << 22}}
    config = scheduler_config(tiny_llama, attention_backend="lminf", additional_config=huge, max_num_seqs=256,
                              max_model_len=1 << 23)  # fmt: skip
    assert config.cache_config.kv_cache_memory_bytes is None
