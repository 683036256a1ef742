"""The real `vllm serve ... --attention-backend lminf` over HTTP on 127.0.0.1.

What comes back over HTTP is held to the same oracles as the offline engine:
vLLM's stock CPU backend while n <= W, the dense float64 reference of SPEC.md
past the window and past the RoPE table.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from conftest import TABLE  # noqa: E402
from engine import engine, random_prompt, sample_logprobs  # noqa: E402
from lminf_vllm.config import LminfConfig  # noqa: E402
from lminf_vllm.testing.reference import DenseLlama  # noqa: E402
from soak import free_port, wait_ready  # noqa: E402

VLLM = Path(sys.executable).with_name("vllm")  # the command users type
G, W = 4, 64  # the module server's lminf settings; C defaults to the table
CFG = LminfConfig(G, W, TABLE)


def serve(model, port, lminf, log_path, *extra):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a server runs its engine as users get it
    cmd = [
        str(VLLM), "serve", str(model), "--attention-backend", "lminf",
        "--additional-config", json.dumps({"lminf": lminf}),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--block-size", "32", *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


@contextlib.contextmanager
def running(model, lminf, log_dir):
    """A served model, ready on 127.0.0.1: (url, log path); stopped on exit."""
    port = free_port()
    log_path = log_dir / "serve.log"
    proc = serve(model, port, lminf, log_path, "--max-model-len", "4096")
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", log_path)
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with running(tiny_llama, {"global_tokens": G, "local_tokens": W}, tmp_path_factory.mktemp("serve")) as s:
        yield s


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return DenseLlama(tiny_llama)


def post(url, path, body) -> dict:
    reply = requests.post(f"{url}{path}", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def check_greedy_is_reference(reference, prompt, token_ids, logprobs):
    """Every generated token is the reference's argmax (up to float ties), with its logprob."""
    tokens = list(prompt) + list(token_ids)
    logp = torch.log_softmax(reference.logits(tokens, CFG), dim=-1)[len(prompt) - 1 : -1]
    chosen = logp.gather(1, torch.tensor(token_ids)[:, None])[:, 0]
    assert (logp.max(dim=1).values - chosen).max() < 1e-3
    torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), chosen, atol=1e-3, rtol=0)


def test_short_completions_equal_stock_vllm_token_for_token(server, tiny_llama):
    """n <= W: over HTTP, the same greedy tokens and logprobs as an offline stock engine."""
    from vllm import SamplingParams

    url, _ = server
    prompts = [random_prompt(n, seed=n) for n in (3, 24)]
    gen = 40  # every sequence stays within W = 64
    body = {"model": str(tiny_llama), "prompt": prompts, "max_tokens": gen, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 1, "return_token_ids": True}  # fmt: skip
    choices = sorted(post(url, "/v1/completions", body)["choices"], key=lambda c: c["index"])
    params = SamplingParams(max_tokens=gen, temperature=0.0, logprobs=0, ignore_eos=True)
    with engine(tiny_llama, backend="CPU_ATTN", max_model_len=TABLE) as llm:
        stock = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for choice, out, prompt in zip(choices, stock, prompts):
        assert choice["prompt_token_ids"] == prompt
        assert choice["token_ids"] == list(out.outputs[0].token_ids)
        served = torch.tensor(choice["logprobs"]["token_logprobs"], dtype=torch.float64)
        torch.testing.assert_close(served, sample_logprobs(out.outputs[0]), atol=1e-4, rtol=0)


def test_prompt_logprobs_past_the_window_equal_the_reference(server, tiny_llama, reference):
    """n = 8x the RoPE table: prompt logprobs (vLLM's extra `prompt_logprobs`) are SPEC.md's."""
    url, _ = server
    prompt = random_prompt(8 * TABLE, seed=21)
    body = {"model": str(tiny_llama), "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
    entries = post(url, "/v1/completions", body)["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt)
    got = torch.tensor([e[str(t)]["logprob"] for e, t in zip(entries[1:], prompt[1:])], dtype=torch.float64)
    expected = reference.prompt_logprobs(prompt, CFG)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    # the check has teeth: without the distance cap the reference is far from what was served
    no_cap = reference.prompt_logprobs(prompt, LminfConfig(G, W, 10**9))
    assert (no_cap - got).abs().max() > 0.05


def test_completions_generate_past_the_rope_table(server, tiny_llama, reference):
    url, log_path = server
    body = {
        "model": str(tiny_llama),
        "prompt": "def main(argv):\n    return sum(int(x) for x in argv)\n" * 3,
        "max_tokens": 400,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 1,
        "return_token_ids": True,
    }
    data = post(url, "/v1/completions", body)
    usage, choice = data["usage"], data["choices"][0]
    assert usage["completion_tokens"] == 400
    assert usage["prompt_tokens"] + usage["completion_tokens"] > 3 * TABLE
    check_greedy_is_reference(reference, choice["prompt_token_ids"], choice["token_ids"], choice["logprobs"]["token_logprobs"])
    assert "lminf attention: global_tokens=4 local_tokens=64 distance_cap=128" in Path(log_path).read_text()


def test_bad_config_stops_serve_with_one_line_naming_the_rule(tiny_llama, tmp_path):
    log_path = tmp_path / "bad.log"
    proc = serve(tiny_llama, free_port(), {"global_tokens": 4, "local_tokens": 500}, log_path)
    assert proc.wait(timeout=240) != 0
    last_line = log_path.read_text().strip().splitlines()[-1]
    assert last_line == (
        "lminf-vllm: error: additional_config.lminf.local_tokens = 500 is invalid: "
        "it must satisfy 1 <= local_tokens <= distance_cap (= 128)"
    )


def test_multi_turn_chat_past_the_context_answers_as_the_reference(server, tiny_llama, reference):
    """Eight turns, the history growing to more than 3x the RoPE table: every
    reply, token for token, is the dense reference's greedy continuation of the
    prompt the server built from the chat template."""
    url, _ = server
    messages = [{"role": "system", "content": "You write small Python helpers."}]
    for turn in range(8):
        messages.append({"role": "user", "content": f"Write helper number {turn} that adds {turn} to x."})
        body = {"model": str(tiny_llama), "messages": messages, "max_tokens": 40, "temperature": 0.0,
                "ignore_eos": True, "logprobs": True, "return_token_ids": True}  # fmt: skip
        data = post(url, "/v1/chat/completions", body)
        choice = data["choices"][0]
        answer = choice["message"]["content"]
        assert data["usage"]["completion_tokens"] == 40 and answer
        prompt = data["prompt_token_ids"]
        assert len(prompt) == data["usage"]["prompt_tokens"]
        logprobs = [entry["logprob"] for entry in choice["logprobs"]["content"]]
        check_greedy_is_reference(reference, prompt, choice["token_ids"], logprobs)
        messages.append({"role": "assistant", "content": answer})
    assert data["usage"]["prompt_tokens"] > 3 * TABLE  # the history is far past the RoPE table


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": "x " * 5000, "max_tokens": 10}, "maximum context length"),
        ({"prompt": "def f():", "max_tokens": 10, "temperature": -1.0}, "temperature"),
    ],
    ids=["longer-than-max-model-len", "bad-sampling-value"],
)
def test_bad_requests_get_400_and_the_server_keeps_serving(server, tiny_llama, body, message):
    url, _ = server
    reply = requests.post(f"{url}/v1/completions", json={"model": str(tiny_llama), **body}, timeout=120)
    assert reply.status_code == 400, reply.text
    assert message in reply.text
    ok = requests.post(f"{url}/v1/completions", json={"model": str(tiny_llama), "prompt": "def f():", "max_tokens": 5}, timeout=120)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
