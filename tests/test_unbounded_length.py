"""max_model_len that costs nothing: an lminf engine at 2^30 tokens starts as one at 131,072,
with vLLM's default request slots, and its per-request rows cost what a request holds."""

import json
import mmap
import os
import subprocess
import sys

from vllm import SamplingParams

from engine import engine, lminf_options, random_prompt, worker_runner
from helpers import resident_bytes

START_PROBE = """
import json, sys
from vllm import LLM, SamplingParams

def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

if __name__ == "__main__":
    model, backend, length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = LLM(model=model, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20, block_size=32,
              attention_backend=backend, max_model_len=length, seed=0,
              additional_config={"lminf": {"global_tokens": 4, "local_tokens": 64}} if backend == "lminf" else {})
    started = rss_mib()
    prompt = [t % 250 + 1 for t in range(3000)]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0]
    batch = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.input_batch
    print("PROBE", json.dumps({"rss_mib": started, "tokens": list(out.outputs[0].token_ids),
                               "slots": batch.max_num_reqs, "width": batch.token_ids_cpu.shape[1]}), flush=True)
"""


def probe(model, backend, length, tmp_path):
    """Start an engine in a fresh interpreter (in process: the worker's memory is its own)."""
    script = tmp_path / "start_probe.py"
    script.write_text(START_PROBE)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    result = subprocess.run([sys.executable, str(script), str(model), backend, str(length)],
                            env=env, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def test_max_model_len_2_30_starts_with_vllms_default_slots_at_the_memory_of_131072(tiny_llama, tmp_path):
    """vLLM's per-slot rows at 2^30 would be 1.25 TiB of token ids alone (256 slots)."""
    small = probe(tiny_llama, "lminf", 131_072, tmp_path)
    huge = probe(tiny_llama, "lminf", 1 << 30, tmp_path)
    assert huge["slots"] == small["slots"] == 256 and huge["width"] == 1 << 30
    assert huge["rss_mib"] < small["rss_mib"] + 200, (small, huge)
    assert huge["tokens"] == small["tokens"]


def test_a_finished_request_gives_its_rows_back(tiny_llama):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    n = 40_000
    with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=1 << 30, max_num_seqs=4) as llm:
        llm.generate([{"prompt_token_ids": random_prompt(n, seed=1)}], params, use_tqdm=False)
        batch = worker_runner(llm).input_batch
        tokens, flags = batch.token_ids_cpu, batch.is_token_ids
        held = resident_bytes(tokens, 0, n), resident_bytes(flags, 0, n)
        assert held[0] >= n * 4 - 4096 and held[1] >= n - 4096  # the long request's row was written
        # the next step removes the finished request from the batch: its pages go back; the new
        # request (in the same slot) writes one page of each
        llm.generate([{"prompt_token_ids": random_prompt(100, seed=2)}], params, use_tqdm=False)
        after = resident_bytes(tokens, 0, n), resident_bytes(flags, 0, n)
    assert after[0] <= 4096 and after[1] <= 4096, (held, after)


def reserved_lazily(array) -> bool:
    """Is this numpy array (or one it views) backed by an anonymous mapping of lazy_zeros?"""
    while array is not None:
        if isinstance(array, mmap.mmap):
            return True
        array = array.obj if isinstance(array, memoryview) else getattr(array, "base", None)
    return False


def test_stock_engines_keep_vllms_buffers(tiny_llama):
    with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=4096, max_num_seqs=4) as llm:
        assert reserved_lazily(worker_runner(llm).input_batch.token_ids_cpu)  # the check can see it
    with engine(tiny_llama, backend="CPU_ATTN", max_model_len=128, max_num_seqs=4) as llm:
        batch = worker_runner(llm).input_batch
        assert not hasattr(batch, "_lminf_lazy_rows")
        assert batch.token_ids_cpu.shape == (4, 128) and not reserved_lazily(batch.token_ids_cpu)
        assert not reserved_lazily(batch.block_table.block_tables[0].block_table.np)
