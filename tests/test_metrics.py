"""lminf's series on the real `vllm serve`'s Prometheus `/metrics` (docs/serving.md, Metrics).

The counts are made in the engine-core process (KV manager, attention builder)
and exported by the API server's registry: this runs them across that boundary,
as users start a server, and holds them to what one request must have done.
"""

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from test_serve import running  # first: it puts benchmarks/ (soak) on the path
from engine import random_prompt  # noqa: I001
from lminf_vllm.block_policy import freeable_blocks, max_blocks_per_sequence

G, W, B = 4, 64, 32  # B: the block size test_serve.serve starts with
PROMPT, GEN = 384, 30  # far past G + W; the window crosses no block boundary while decoding


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """vllm:lminf_* samples by name, keyed by their labels (without model_name)."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("vllm:lminf_"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                samples.setdefault(s.name, {})[labels] = s.value
    return samples


def rows_by_path(samples) -> dict[str, float]:
    return {dict(k)["path"]: v for k, v in samples.get("vllm:lminf_attention_rows_total", {}).items()}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with running(tiny_llama, {"global_tokens": G, "local_tokens": W}, tmp_path_factory.mktemp("metrics")) as (url, _):
        yield url


def test_one_request_past_the_window_is_counted_on_metrics(server, tiny_llama):
    before = scrape(server)
    # the block series are there from start-up, at 0; no rows served yet
    assert before["vllm:lminf_kv_blocks_freed_total"] == {(("engine", "0"),): 0.0}
    assert before["vllm:lminf_kv_blocks_held"] == {(("engine", "0"),): 0.0}
    assert sum(rows_by_path(before).values()) == 0

    prompt = random_prompt(PROMPT, seed=7)
    body = {"model": str(tiny_llama), "prompt": prompt, "max_tokens": GEN, "temperature": 0.0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    held_while_decoding = []
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=300) as reply:
        assert reply.status_code == 200, reply.text
        for i, line in enumerate(reply.iter_lines()):
            if i in (5, 20):  # mid-decode: what the running sequence holds now
                held_while_decoding.append(scrape(server)["vllm:lminf_kv_blocks_held"][(("engine", "0"),)])
    after = scrape(server)

    # every query row the model computed, once: the prompt and each generated
    # token but the last (never fed back), by whichever path served it
    rows = rows_by_path(after)
    assert sum(rows.values()) == PROMPT + GEN - 1, rows
    assert all(p.startswith("cpu_kernel ") or p == "pytorch" for p in rows), rows
    assert sum(v for p, v in rows.items() if "prefill" in p or p == "cpu_kernel plain") >= PROMPT - (W + G)

    # the middle blocks the Λ policy freed: all between the global block and the window
    freed = after["vllm:lminf_kv_blocks_freed_total"][(("engine", "0"),)]
    expected = {len(freeable_blocks(n, G, W, B)) for n in range(PROMPT, PROMPT + GEN)}
    assert len(expected) == 1 and freed == expected.pop() > 0

    # while decoding, the sequence held blocks within lminf's bound; nothing once it finished
    bound = max_blocks_per_sequence(G, W, B)
    assert held_while_decoding and all(0 < h <= bound for h in held_while_decoding), (held_while_decoding, bound)
    assert after["vllm:lminf_kv_blocks_held"][(("engine", "0"),)] == 0


def test_only_lminf_engines_get_the_series(tiny_llama):
    """vLLM's StatLoggerManager (what AsyncLLM and LLMEngine build) in this process: a stock
    engine's config gets vLLM's loggers only, an lminf engine's adds the lminf series."""
    from prometheus_client import REGISTRY
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.metrics.loggers import StatLoggerManager

    def series() -> set[str]:
        return {name for name in REGISTRY._names_to_collectors if name.startswith("vllm:lminf_")}

    def config(**kwargs):
        return EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=128, **kwargs).create_engine_config()

    def lminf_loggers(manager) -> int:
        return sum(type(logger).__name__ == "LminfStatLogger" for logger in manager.stat_loggers)

    stock = StatLoggerManager(config())
    assert series() == set() and lminf_loggers(stock) == 0
    lminf = StatLoggerManager(config(attention_backend="lminf", additional_config={"lminf": {}}))
    assert "vllm:lminf_kv_blocks_freed_total" in series() and lminf_loggers(lminf) == 1
    assert "vllm:lminf_topk_host_store_bytes" not in series()  # only top-k engines have a host store
    StatLoggerManager(config(attention_backend="lminf", additional_config={"lminf": {"topk_blocks": 2}}))
    assert "vllm:lminf_topk_host_store_bytes" in series()
    StatLoggerManager(config())  # a stock engine built after it drops them, as vLLM drops its own
    assert series() == set()
