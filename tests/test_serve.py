"""The real `vllm serve ... --attention-backend lminf` over HTTP on 127.0.0.1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from conftest import TABLE  # noqa: E402
from soak import free_port, wait_ready  # noqa: E402

VLLM = Path(sys.executable).with_name("vllm")  # the command users type


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


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = serve(tiny_llama, port, {"global_tokens": 4, "local_tokens": 64}, log_path, "--max-model-len", "4096")
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", log_path)
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_completions_generate_past_the_rope_table(server, tiny_llama):
    url, log_path = server
    body = {
        "model": str(tiny_llama),
        "prompt": "def main(argv):\n    return sum(int(x) for x in argv)\n" * 3,
        "max_tokens": 400,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 1,
    }
    reply = requests.post(f"{url}/v1/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    usage = data["usage"]
    assert usage["completion_tokens"] == 400
    assert usage["prompt_tokens"] + usage["completion_tokens"] > 3 * TABLE
    logprobs = data["choices"][0]["logprobs"]["token_logprobs"]
    assert all(lp is not None and lp > -1e9 for lp in logprobs)  # finite all the way
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


def test_multi_turn_chat_past_the_context_keeps_answering(server, tiny_llama):
    url, _ = server
    messages = [{"role": "system", "content": "You write small Python helpers."}]
    for turn in range(8):
        messages.append({"role": "user", "content": f"Write helper number {turn} that adds {turn} to x."})
        reply = requests.post(
            f"{url}/v1/chat/completions",
            json={"model": str(tiny_llama), "messages": messages, "max_tokens": 40, "temperature": 0.0, "ignore_eos": True},
            timeout=300,
        )
        assert reply.status_code == 200, reply.text
        data = reply.json()
        answer = data["choices"][0]["message"]["content"]
        assert data["usage"]["completion_tokens"] == 40 and answer
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
