"""What the engine really runs: the backend class in the worker, the RoPE table."""

import json
import os
import subprocess
import sys

import torch
from vllm import SamplingParams

from conftest import TABLE
from engine import engine, lminf_options, random_prompt, worker_model
from lminf_vllm.rope import cos_sin, default_inv_freq, rotate


MULTIPROCESS_PROBE = """
import json, sys
from vllm import LLM, SamplingParams

def attention_impls(worker):  # runs inside the worker process
    from vllm.model_executor.layers.attention import Attention
    return sorted({type(m.impl).__name__ for m in worker.model_runner.model.modules() if isinstance(m, Attention)})

if __name__ == "__main__":
    model, prompt = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=model, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
              attention_backend="lminf", block_size=32, max_model_len=1024, seed=0,
              additional_config={"lminf": {"global_tokens": 4, "local_tokens": 64, "distance_cap": 96}})
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    print("PROBE", json.dumps({"client": type(llm.llm_engine.engine_core).__name__,
                      "impls": llm.collective_rpc(attention_impls),
                      "tokens": list(out.outputs[0].token_ids)}), flush=True)
"""


def test_multiprocess_engine_runs_lminf_in_its_worker(tiny_llama, tmp_path):
    """Engine core and worker in their own processes (as `vllm serve` runs them):
    the plugin loads there through its entry point and gives the same tokens."""
    prompt = random_prompt(150, seed=5)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    with engine(tiny_llama, lminf=lminf_options(4, 64, 96), max_model_len=1024) as llm:
        in_process = list(llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids)
    script = tmp_path / "probe.py"
    script.write_text(MULTIPROCESS_PROBE)
    # A fresh interpreter: vLLM caches its environment once an engine started here.
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_llama), json.dumps(prompt)], env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("PROBE "))
    probe = json.loads(line.removeprefix("PROBE "))
    assert probe["client"] == "SyncMPClient"  # really out of process
    assert probe["impls"] == [["LminfAttentionImpl"]]
    assert probe["tokens"] == in_process


def test_rope_is_exact_past_max_position_embeddings_with_no_table_that_grows(tiny_llama):
    with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=1 << 24, max_num_seqs=2) as llm:
        rope = worker_model(llm).model.layers[0].self_attn.rotary_emb
        assert rope.cos_sin_cache.shape[0] == TABLE  # the stock table, not one row per position
        positions = torch.tensor([0, 5, TABLE - 1, TABLE, 100_000, 7_654_321, (1 << 30) - 1])
        q = torch.randn(len(positions), 4 * 32, generator=torch.Generator().manual_seed(0))
        k = torch.randn(len(positions), 2 * 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            q_rot, k_rot = rope(positions, q.clone(), k.clone())  # vLLM's own op, as the model calls it
        spec = worker_model(llm).model.layers[0].self_attn.attn.impl.rotary
    cos, sin = cos_sin(positions[:, None], default_inv_freq(10000.0, 32), torch.float32)
    # stock rows: float32 angles (off by ~1e-6 at 127); past them float64 angles, exact to float32
    # rounding even at 2^30 (float32 angles would be off by radians there)
    torch.testing.assert_close(q_rot.view(-1, 4, 32), rotate(q.view(-1, 4, 32), cos, sin, spec), atol=1e-5, rtol=0)
    torch.testing.assert_close(k_rot.view(-1, 2, 32), rotate(k.view(-1, 2, 32), cos, sin, spec), atol=1e-5, rtol=0)


def test_stock_rope_rows_are_untouched(tiny_llama):
    with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=4096) as llm:
        lminf_rows = worker_model(llm).model.layers[0].self_attn.rotary_emb.cos_sin_cache[:TABLE].clone()
    with engine(tiny_llama, backend="CPU_ATTN", max_model_len=TABLE) as llm:
        stock_rows = worker_model(llm).model.layers[0].self_attn.rotary_emb.cos_sin_cache
    assert stock_rows.shape[0] == TABLE
    assert torch.equal(lminf_rows, stock_rows)
