"""Tensor parallel 2 on CPU with vLLM's multiprocessing executor (the Ray executor: test_ray.py):
the plugin loads in both workers, each with half the KV heads, same tokens as TP=1."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # second tier (`make test-all`): two TP=2 engine starts: about 75 s

PROBE = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    model, tp = sys.argv[1], int(sys.argv[2])
    prompt = [(7 * i) % 250 + 1 for i in range(300)]  # past the 128-position table
    llm = LLM(model=model, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
              attention_backend="lminf", block_size=32, max_model_len=1024, seed=0, tensor_parallel_size=tp,
              additional_config={"lminf": {"global_tokens": 4, "local_tokens": 64, "distance_cap": 96}})
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    print("PROBE", json.dumps(list(out.outputs[0].token_ids)), flush=True)
"""


def generate(model, tmp_path, tp: int) -> list[int]:
    script = tmp_path / "tp_probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1" if tp == 2 else "nobind")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    result = subprocess.run([sys.executable, str(script), str(model), str(tp)], env=env,
                            capture_output=True, text=True, timeout=400)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def test_tensor_parallel_2_equals_1(tiny_llama, tmp_path, shm_left_behind):
    """Two TP=2 starts in a row, as one CI job runs them: each leaves no segment in /dev/shm
    once cleaned, so a later start on a reused port cannot fail with EEXIST."""
    one = generate(tiny_llama, tmp_path, 1)
    assert len(one) == 100
    for _ in range(2):
        assert generate(tiny_llama, tmp_path, 2) == one
        assert shm_left_behind() == []
