"""Top-k middle blocks through the real `vllm serve` over HTTP (docs/topk-contract.md).

A server started as users start it, with topk_blocks in --additional-config:
its prompt logprobs and greedy completions past the window and past the RoPE
table equal the dense top-k reference with the chunks the server used (a lone
request's prompt fits one step's budget, each decode step is a chunk of one
row), its /metrics count the rows on the top-k path and the host store's bytes, and it logs that
prefix caching is off and that a query attends more keys than the model was trained with. Its host
store is capped at one chunk per layer (topk_store_max_bytes): a request that could never fit gets
HTTP 400 naming the setting.
"""

import functools

import pytest
import requests
import torch

from test_serve import post, reference, running  # noqa: F401 (reference is a fixture); first: it puts benchmarks/ on the path
from engine import random_prompt  # noqa: I001
from test_metrics import rows_by_path, scrape
from conftest import TABLE
from lminf_vllm.config import LminfConfig
from lminf_vllm.testing.topk_reference import dense_topk_attention

G, W, C, K, B = 4, 64, 64, 2, 32  # B: the block size test_serve.serve starts with
CFG = LminfConfig(G, W, C)
# The store's bytes per chunk of each layer (docs/topk-contract.md, "The store's size"): the tiny model's 2 layers,
# 2 KV heads of 32, float32; chunks of 2,048 / B = 64 blocks, each one copy of keys and values, and 2 D summaries
CHUNK = 2 * 64 * (B * 2 * (32 + 32) * 4 + 2 * 2 * 32 * 4)
CAP = CHUNK  # requests of up to 64 blocks (2,048 tokens with max_tokens)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    lminf = {"global_tokens": G, "local_tokens": W, "distance_cap": C, "topk_blocks": K, "topk_store_max_bytes": CAP}
    with running(tiny_llama, lminf, tmp_path_factory.mktemp("topk-serve")) as s:
        yield s


def topk(chunks):
    return functools.partial(dense_topk_attention, topk=K, block_size=B, chunks=chunks)


def complete(url, body) -> dict:
    return post(url, "/v1/completions", body)["choices"][0]


def test_prompt_logprobs_equal_the_topk_reference(server, tiny_llama, reference):
    url, log_path = server
    prompt = random_prompt(8 * TABLE, seed=31)  # one chunk: within serve's 2,048-token step budget
    entries = complete(url, {"model": str(tiny_llama), "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                         "prompt_logprobs": 0})["prompt_logprobs"]  # fmt: skip
    got = torch.tensor([e[str(t)]["logprob"] for e, t in zip(entries[1:], prompt[1:])], dtype=torch.float64)
    expected = reference.prompt_logprobs(prompt, CFG, attention=topk([len(prompt)]))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    # the check has teeth: Λ alone is far from what was served
    assert (reference.prompt_logprobs(prompt, CFG) - got).abs().max() > 0.05
    log = log_path.read_text()
    assert "prefix caching is off" in log
    # G=4 W=64 k=2 B=32 attend up to 32 + 64 + 31 + 64 keys, past the tiny model's TABLE = 128
    assert "a query attends up to 191 keys (global blocks, local_tokens=64" in log
    assert f"more than the {TABLE} this model was trained with" in log
    assert f"topk_store_max_bytes={CAP}" in log  # the start-up line says the cap


def test_greedy_completion_equals_the_topk_reference(server, tiny_llama, reference):
    url, _ = server
    prompt, gen = random_prompt(5 * TABLE, seed=32), 40
    choice = complete(url, {"model": str(tiny_llama), "prompt": prompt, "max_tokens": gen, "temperature": 0.0,
                        "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True})  # fmt: skip
    tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    assert len(tokens) == gen
    chunks = [len(prompt)] + [1] * (gen - 1)  # the prompt, then one row per decode step
    logp = torch.log_softmax(reference.logits(prompt + tokens[:-1], CFG, attention=topk(chunks)), dim=-1)
    logp = logp[len(prompt) - 1 :]
    chosen = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert (logp.max(dim=1).values - chosen).max() < 1e-3  # each token is the reference's argmax
    served = torch.tensor(choice["logprobs"]["token_logprobs"], dtype=torch.float64)
    torch.testing.assert_close(served, chosen, atol=1e-3, rtol=0)


def test_metrics_count_the_topk_rows(server):
    url, _ = server
    samples = scrape(url)
    rows = rows_by_path(samples)
    # prompts take the chunk way, the greedy completion's decode steps (past the window) the decode way
    assert set(rows) == {"topk", "topk decode"} and min(rows.values()) > 0, rows
    # the host store's size: what the last step left (the finished requests go with the next step): the
    # greedy completion's 679 tokens, 21 blocks, in one chunk per layer
    held = samples["vllm:lminf_topk_host_store_bytes"][(("engine", "0"),)]
    assert held == CHUNK, held


def test_a_request_that_could_never_fit_the_store_is_refused_with_http_400(server, tiny_llama):
    url, _ = server
    body = {"model": str(tiny_llama), "prompt": random_prompt(100, seed=33), "max_tokens": 3000}
    reply = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert "prompt 100 tokens + max_tokens 3000" in reply.text and f"topk_store_max_bytes = {CAP}" in reply.text
    choice = complete(url, {"model": str(tiny_llama), "prompt": random_prompt(100, seed=33), "max_tokens": 3})
    assert choice["text"] is not None  # within the cap: served
