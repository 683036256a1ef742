"""The top-k host store's memory in the real engine (docs/topk-contract.md, "The store's size").

What a request holds is the docs' formula, one copy of each key; the cap
(`topk_store_max_bytes`) refuses by name a request that could never fit, and
holds back one that fits alone but not beside the running ones; the store
forgets a request when it finishes and when it is preempted (it is computed
again from its first token on resume).
"""

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError  # a client error: HTTP 400 in `vllm serve`

from engine import engine, page_bytes, random_prompt
from lminf_vllm.paths.topk.store import CHUNK_TOKENS

LAYERS, HKV, D, FLOAT32 = 2, 2, 32, 4  # the tiny Llama (conftest), float32


def topk(**extra):
    return {"lminf": {"global_tokens": 4, "local_tokens": 64, "distance_cap": 64, "topk_blocks": 2, **extra}}


def formula_bytes(tokens: int, B: int, int8: bool = False) -> int:
    """The docs' formula, written out: per layer, the complete blocks in whole chunks of
    ceil(CHUNK_TOKENS / B) blocks, each block one copy of its keys (at position 0) and its values
    in the cache dtype, and its summary (2 D float32 per KV head); with int8 (topk_score
    "mass_int8") the keys' 8-bit copy too (a byte a channel, a float32 scale a key)."""
    per_chunk = -(-CHUNK_TOKENS // B)
    chunks = -(-(tokens // B) // per_chunk)
    per_block = B * HKV * (D + D) * FLOAT32 + HKV * 2 * D * 4 + (B * HKV * (D + 4) if int8 else 0)
    return LAYERS * chunks * per_chunk * per_block


@pytest.fixture
def stores(monkeypatch):
    """Every plan's store bytes and dropped requests, in order (the worker runs in this process)."""
    import lminf_vllm.paths.topk as topk_path

    seen = {"bytes": [], "dropped": [], "chunks": [], "store": None}
    plan = topk_path.plan

    def recording(batch, shape):
        p = plan(batch, shape)
        seen["store"] = p.store
        seen["dropped"].append(set(batch.finished))
        seen["chunks"].append([(rid, n - (b - a), n) for _, a, b, n, rid in p.chunks])  # (request, s, e)
        seen["bytes"].append(p.host_store_bytes)
        return p

    monkeypatch.setattr(topk_path, "plan", recording)
    return seen


def test_a_32k_request_holds_the_formulas_bytes_one_copy(tiny_llama, stores):
    B, n = 128, 32768
    with engine(tiny_llama, lminf=topk(), block_size=B, max_model_len=n + 64, max_num_batched_tokens=2048,
                kv_cache_memory_bytes=64 << 20) as llm:  # fmt: skip
        llm.generate([{"prompt_token_ids": random_prompt(n, seed=32)}], SamplingParams(max_tokens=2, ignore_eos=True),
                     use_tqdm=False)  # fmt: skip
        store = stores["store"]
        (rid,) = store.requests()  # vLLM reports it finished with the next step: still held
        computed = n + 1  # the prompt and the first sampled token
        assert store.nbytes() == formula_bytes(computed, B) == stores["bytes"][-1]  # the /metrics gauge's value
        keys_and_values = LAYERS * (computed // B) * B * HKV * 2 * D * FLOAT32
        assert store.nbytes() < 1.1 * keys_and_values  # one copy of K and V (three copies of K were 1.5x)
        llm.generate([{"prompt_token_ids": random_prompt(20, seed=1)}], SamplingParams(max_tokens=1), use_tqdm=False)
        assert store.nbytes() == 0 and store.requests() == set()  # finished: gone (the short one stores nothing)


def test_a_request_that_can_never_fit_is_refused_by_name(tiny_llama):
    B = 32
    cap = formula_bytes(2048, B)  # one chunk per layer: 64 blocks of 32
    with engine(tiny_llama, lminf=topk(topk_store_max_bytes=cap), block_size=B, max_model_len=4096) as llm:
        prompt = {"prompt_token_ids": random_prompt(900, seed=3)}
        with pytest.raises(VLLMValidationError, match=r"prompt 900 tokens \+ max_tokens 1500.*topk_store_max_bytes = \d+"):
            llm.generate([prompt], SamplingParams(max_tokens=1500), use_tqdm=False)
        with pytest.raises(VLLMValidationError, match=r"max_tokens 3196\)"):  # None: max_model_len - prompt
            llm.generate([prompt], SamplingParams(max_tokens=None), use_tqdm=False)  # (as the API's unset)
        out = llm.generate([prompt], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 100  # within the cap: served


def test_the_8_bit_copy_is_counted_in_the_bytes_and_by_the_cap(tiny_llama, stores):
    """topk_score "mass_int8": a request holds the formula with the 8-bit copy, and a cap that its
    keys and values alone would fit (2,900 tokens in two chunks a layer) refuses it by name."""
    B = 32
    with engine(tiny_llama, lminf=topk(topk_score="mass_int8", topk_store_max_bytes=formula_bytes(4096, B)),
                block_size=B, max_model_len=4096) as llm:  # fmt: skip
        prompt = {"prompt_token_ids": random_prompt(900, seed=7)}
        assert formula_bytes(2900, B) <= formula_bytes(4096, B) < formula_bytes(2900, B, int8=True)
        with pytest.raises(VLLMValidationError, match=r"prompt 900 tokens \+ max_tokens 2000.*topk_store_max_bytes"):
            llm.generate([prompt], SamplingParams(max_tokens=2000), use_tqdm=False)
        llm.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
        assert stores["bytes"][-1] == formula_bytes(901, B, int8=True) > formula_bytes(901, B)


def test_requests_that_fit_alone_wait_for_room_and_the_cap_holds(tiny_llama, stores):
    """Three requests that each fit the cap alone, two together not: the scheduler holds the later
    ones back (first in the queue) until the running one ends; the store never passes the cap."""
    B = 32
    cap = formula_bytes(700 + 20, B)  # one request (a chunk per layer), not two
    with engine(tiny_llama, lminf=topk(topk_store_max_bytes=cap), block_size=B, max_model_len=4096,
                max_num_seqs=4) as llm:  # fmt: skip
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        prompts = [{"prompt_token_ids": random_prompt(700, seed=s)} for s in (4, 5, 6)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
        held = scheduler.__dict__.get("_lminf_held_back", 0)
    assert all(len(o.outputs[0].token_ids) == 20 for o in outs)
    assert held == 2  # the second and third waited
    assert max(stores["bytes"]) <= cap and max(stores["bytes"]) == formula_bytes(720 - 1, B)
    running_together = max(len({rid for rid, _, _ in step}) for step in stores["chunks"])
    assert running_together == 1


def test_a_preempted_request_is_dropped_and_computed_again(tiny_llama, stores):
    """A pool of 12 blocks for 4 requests of ~200 tokens forces preemption (as in
    test_topk_engine): each preempted request leaves the store before it is computed again from
    its first token, and nothing is left once all have finished."""
    B = 32
    prompts = [random_prompt(n, seed=n) for n in (200, 210, 220, 230)]
    with engine(tiny_llama, lminf=topk(), block_size=B, max_model_len=1024, max_num_batched_tokens=128,
                max_num_seqs=4, kv_cache_memory_bytes=12 * page_bytes()) as llm:  # fmt: skip
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        preempt, preempted = scheduler._preempt_request, []
        scheduler._preempt_request = lambda r, *a, **kw: (preempted.append(r.request_id), preempt(r, *a, **kw))[1]
        llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=10, ignore_eos=True),
                     use_tqdm=False)  # fmt: skip
        llm.generate([{"prompt_token_ids": random_prompt(20, seed=1)}], SamplingParams(max_tokens=1), use_tqdm=False)
        store = stores["store"]
        assert store.nbytes() == 0 and store.requests() == set()
    assert preempted, "the pool was meant to force preemption"
    for rid in set(preempted):
        starts = [i for i, step in enumerate(stores["chunks"]) for r, s, _ in step if r == rid and s == 0]
        assert len(starts) >= 2, (rid, starts)  # computed again from its first token
        for again in starts[1:]:  # and dropped from the store since its last computation began
            assert any(rid in d for d in stores["dropped"][starts[0] + 1 : again + 1]), (rid, again)
