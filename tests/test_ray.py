"""vLLM's Ray executor with lminf on CPU (`distributed_executor_backend="ray"`).

One local Ray runtime for the module (2 CPUs, a small object store), torn down
at the end whatever happens. TP=2 under Ray is held to TP=1 without it, past
the model's 128-position RoPE table, on a KV pool that only the Λ bound makes
large enough; each Ray worker is asked, in its own process, whether the plugin
is loaded there and which attention its layers run. Then the bad combinations
stop at start-up, and `vllm serve` runs its TP=2 engine on the same Ray runtime.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
from vllm import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from conftest import TABLE  # noqa: E402
from engine import engine, held_blocks, kv_manager, lminf_options, page_bytes, prompt_logprobs, random_prompt  # noqa: E402
from lminf_vllm import runtime_patches  # noqa: E402
from lminf_vllm.block_policy import max_blocks_per_sequence  # noqa: E402
from lminf_vllm.testing.workers import report  # noqa: E402
from soak import free_port, wait_ready  # noqa: E402

pytestmark = pytest.mark.slow  # second tier (`make test-all`): Ray on two nodes and TP=2 under Ray: about 170 s

ray = pytest.importorskip("ray")

G, W, C, B = 4, 64, 96, 32  # small, as in test_tensor_parallel.py
STEP = 256  # max_num_batched_tokens: the prefill chunk in flight
PROMPTS = [random_prompt(800, seed=51), random_prompt(600, seed=52)]  # 4.7-6.3x the table
POOL = 2 * max_blocks_per_sequence(G, W, B, in_flight_tokens=STEP) + 2  # both prompts at once, under the bound
LMINF_BACKEND = "lminf_vllm.backend"


@pytest.fixture(scope="module")
def ray_runtime():
    """A fresh local Ray (never one a `ray start` left on this machine), shut down at the end."""
    context = ray.init(address="local", num_cpus=2, object_store_memory=80 << 20, include_dashboard=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def lminf_engine(model, tp, **kw):
    """kv_cache_memory_bytes is per worker: each of TP ranks holds 1/TP of the KV heads, so POOL blocks either way."""
    options = dict(
        lminf=lminf_options(G, W, C), max_model_len=1 << 20, max_num_batched_tokens=STEP, max_num_seqs=4,
        kv_cache_memory_bytes=POOL * page_bytes() // tp, tensor_parallel_size=tp,
    )  # fmt: skip
    if tp > 1:
        options["distributed_executor_backend"] = "ray"
    options.update(kw)
    return engine(model, **options)


def run(llm):
    params = SamplingParams(max_tokens=40, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), prompt_logprobs(o, p)) for o, p in zip(outs, PROMPTS)]


@pytest.fixture(scope="module")
def tp1(tiny_llama):
    with lminf_engine(tiny_llama, 1) as llm:
        assert kv_manager(llm).block_pool.num_gpu_blocks == POOL
        return run(llm)


@pytest.fixture(scope="module")
def tp2_ray(tiny_llama, ray_runtime):
    """One TP=2 Ray engine for the module's checks: its outputs, its workers' reports, its peak blocks."""
    with lminf_engine(tiny_llama, 2) as llm:
        assert type(llm.llm_engine.engine_core.engine_core.model_executor).__name__ == "RayExecutorV2"
        manager = kv_manager(llm)
        outputs = run(llm)
        reports = llm.collective_rpc(report)
        result = {"outputs": outputs, "reports": reports, "pool": manager.block_pool.num_gpu_blocks,
                  "peaks": held_blocks_per_step(llm, manager)}  # fmt: skip
        placement = llm.llm_engine.engine_core.engine_core.model_executor.parallel_config.placement_group
    # vLLM leaves an in-process engine's placement group to the end of the Ray job:
    # give its 2 CPUs back for the server test
    ray.util.remove_placement_group(placement)
    return result


def held_blocks_per_step(llm, manager):
    """Step a 900-token prompt and 100 decoded tokens (past W) by hand; the peak blocks held in prefill and in decode."""
    core = llm.llm_engine
    core.add_request("long", {"prompt_token_ids": random_prompt(900, seed=53)},
                     SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))  # fmt: skip
    peak = {"prefill": 0, "decode": 0}
    while core.has_unfinished_requests():
        outputs = core.step()
        held = max(held_blocks(manager).values(), default=0)
        running = list(core.engine_core.engine_core.scheduler.requests.values())
        phase = "decode" if running and running[0].num_computed_tokens > running[0].num_prompt_tokens else "prefill"
        peak[phase] = max(peak[phase], held)
    assert outputs and len(outputs[0].outputs[0].token_ids) == 100
    return peak


def test_tp2_with_ray_equals_tp1_past_the_rope_table(tp1, tp2_ray):
    assert all(len(p) > 4 * TABLE for p in PROMPTS)
    for (tokens_1, logprobs_1), (tokens_2, logprobs_2) in zip(tp1, tp2_ray["outputs"]):
        assert len(tokens_1) == 40
        assert tokens_2 == tokens_1
        torch.testing.assert_close(logprobs_2, logprobs_1, atol=1e-4, rtol=0)


def test_every_ray_worker_loaded_the_plugin_and_runs_lminf(tp2_ray):
    reports = tp2_ray["reports"]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert len({r["pid"] for r in reports}) == 2 and os.getpid() not in {r["pid"] for r in reports}
    for r in reports:
        assert r["ray_node_id"], r  # a Ray actor, not an in-process worker
        assert r["patches_applied"] == dict.fromkeys(runtime_patches.PATCH_MODULES, True), r
        assert len(r["attention_impls"]) == 1 and r["attention_impls"][0].startswith(LMINF_BACKEND + "."), r
        assert r["kv_cache_specs"] == ["LminfSpec"], r


def test_the_kv_bound_holds_on_every_rank(tiny_llama, tp2_ray):
    """The scheduler's block accounting is shared by the ranks: every rank's cache is the
    POOL blocks of its half of the KV heads, and no sequence ever holds more than the bound."""
    full = sum(len(p) + 40 for p in PROMPTS) // B
    assert tp2_ray["pool"] == POOL < full  # both prompts at once fit only thanks to the bound
    for r in tp2_ray["reports"]:
        assert r["kv_heads_per_layer"] == [1], r  # the tiny model's 2 KV heads, split in two
        assert r["kv_cache_bytes"] == POOL * page_bytes() // 2, r
        assert all(shape[0] == POOL for shape in r["kv_cache_shapes"]), r
    peaks = tp2_ray["peaks"]
    assert 0 < peaks["decode"] <= max_blocks_per_sequence(G, W, B), peaks
    assert peaks["prefill"] <= max_blocks_per_sequence(G, W, B, in_flight_tokens=STEP), peaks


@pytest.mark.parametrize(
    "options, env, message",
    [
        ({"pipeline_parallel_size": 2}, {}, r"pipeline_parallel_size=2 is not supported by lminf on CPU"),
        ({"tensor_parallel_size": 2}, {"VLLM_USE_RAY_V2_EXECUTOR_BACKEND": "0"},
         r"distributed_executor_backend='ray' with VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0 is not supported by lminf on CPU"),
        ({"tensor_parallel_size": 3}, {}, r"attention heads \(4\) must be divisible by tensor parallel size \(3\)"),
    ],
    ids=["pipeline-parallel", "old-ray-executor", "tp-not-dividing-heads"],
)  # fmt: skip
def test_bad_combinations_stop_at_start_up(tiny_llama, ray_runtime, monkeypatch, options, env, message):
    from vllm import envs

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    envs.disable_envs_cache()  # an earlier in-process engine froze vLLM's reading of the environment
    before = ray.util.placement_group_table()
    with pytest.raises(Exception, match=message):
        with engine(tiny_llama, lminf=lminf_options(G, W, C), max_model_len=4096,
                    distributed_executor_backend="ray", **options):  # fmt: skip
            pass
    assert ray.util.placement_group_table() == before  # refused before any Ray worker was placed


def test_a_stock_engine_still_gets_vllms_own_ray_refusal(tiny_llama, ray_runtime):
    """The Ray patches act for lminf engines only."""
    with pytest.raises(ValueError, match="current platform cpu does not support ray"):
        with engine(tiny_llama, backend="CPU_ATTN", max_model_len=TABLE, tensor_parallel_size=2,
                    distributed_executor_backend="ray"):  # fmt: skip
            pass


def test_vllm_serve_with_ray_tp2_answers_past_the_context(tiny_llama, tmp_path, ray_runtime, tp1):
    """The real `vllm serve ... --distributed-executor-backend ray --tensor-parallel-size 2` on
    127.0.0.1, its workers on this module's Ray runtime: the greedy tokens of TP=1 over HTTP."""
    port, log_path = free_port(), tmp_path / "serve.log"
    env = dict(os.environ, RAY_ADDRESS=ray_runtime, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # as users run it
    cmd = [
        str(Path(sys.executable).with_name("vllm")), "serve", str(tiny_llama), "--attention-backend", "lminf",
        "--distributed-executor-backend", "ray", "--tensor-parallel-size", "2",
        "--additional-config", json.dumps(lminf_options(G, W, C)), "--max-model-len", "8192",
        "--max-num-batched-tokens", str(STEP), "--dtype", "float32", "--enforce-eager", "--block-size", str(B),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log_path, timeout=300)
        model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        for prompt, (tokens, _) in zip(PROMPTS, tp1):
            body = {"model": model, "prompt": prompt, "max_tokens": 40, "temperature": 0.0,
                    "ignore_eos": True, "return_token_ids": True}  # fmt: skip
            reply = requests.post(f"{url}/v1/completions", json=body, timeout=300)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["token_ids"] == tokens
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "RayExecutorV2" in log_path.read_text() or "RayWorkerProc" in log_path.read_text()
