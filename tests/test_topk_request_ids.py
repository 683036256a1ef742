"""A top-k engine must know its requests: the host store is keyed by vLLM's request id.

The model runner publishes a step's ids while it builds the step's attention
metadata (runtime_patches/patch_worker_gpu_model_runner.py). A real step that
finds none stops with an error naming why, instead of serving Λ plus the edge
blocks; a dummy run (start-up, compile warm-up) is told apart by the runner's
own dummy-run call, not by tolerating missing ids.
"""

import pytest
from vllm import SamplingParams

from engine import engine, random_prompt, worker_runner
from lminf_vllm import step

TOPK = {"lminf": {"global_tokens": 4, "local_tokens": 32, "distance_cap": 48, "topk_blocks": 2}}


def test_what_the_builder_reads_for_each_kind_of_build():
    step.clear_published()
    assert "announced no step" in step.published_requests(2)["missing"]
    step.publish_dummy_run()
    assert step.published_requests(2) == {"dummy": True}
    step.publish_requests(["a", "b"], {"c"})
    assert step.published_requests(2) == {"request_ids": ("a", "b"), "finished": frozenset({"c"})}
    assert step.published_requests(2)["request_ids"] == ("a", "b")  # every builder of the step reads them
    assert "published 2 request ids for a batch of 3" in step.published_requests(3)["missing"]
    step.clear_published()


def test_a_step_without_request_ids_stops_with_an_error_naming_why(tiny_llama, monkeypatch):
    """As if vLLM no longer went through the patched method: the runner publishes nothing."""
    monkeypatch.setattr(step, "publish_requests", lambda ids, finished: None)
    with engine(tiny_llama, lminf=TOPK, block_size=16, max_model_len=1024) as llm:
        with pytest.raises(Exception) as raised:
            llm.generate([{"prompt_token_ids": random_prompt(100, seed=1)}], SamplingParams(max_tokens=2),
                         use_tqdm=False)  # fmt: skip
    text = "".join(str(e) for e in _chain(raised.value))
    assert "topk_blocks=2" in text and "announced no step" in text, text


def test_a_dummy_run_that_builds_attention_metadata_is_served(tiny_llama, monkeypatch):
    """vLLM's own dummy run with attention (as in profiling and compile warm-up): no request, no
    error, nothing stored; a real step after it still stores its request."""
    import lminf_vllm.paths.topk as topk

    seen, plan = [], topk.plan
    monkeypatch.setattr(topk, "plan", lambda batch, shape: (seen.append(batch.dummy), plan(batch, shape))[1])
    with engine(tiny_llama, lminf=TOPK, block_size=16, max_model_len=1024) as llm:
        seen.clear()
        worker_runner(llm)._dummy_run(64, force_attention=True)
        assert seen == [True]  # the path planned it, as a dummy run
        stores = list(topk._STORES.values())
        assert all(not s.requests() for s in stores)
        out = llm.generate([{"prompt_token_ids": random_prompt(100, seed=2)}],
                           SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # fmt: skip
        assert len(out[0].outputs[0].token_ids) == 2
        assert any(s.requests() for s in topk._STORES.values())  # the real steps were keyed by request


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
