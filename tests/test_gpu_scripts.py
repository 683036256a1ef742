"""The GPU scripts still run: each once on CPU under Triton's interpreter, tiny.

benchmarks/gpu_run.sh is only run where a GPU is lent (see the README's "Speed
on a GPU"); these keep its parts from rotting in between. They check that the
scripts run end to end and write their JSON, and that gpu_check's kernel cases
pass; the numbers they print on CPU mean nothing.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--batch", "2", "--heads", "4", "--kv-heads", "2", "--head-size", "32",
        "--global-tokens", "4", "--local-tokens", "32", "--distance-cap", "48", "--dtype", "float32"]  # fmt: skip


def run(script, *args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_gpu_kernel_benchmark_runs(tmp_path):
    out = tmp_path / "k.json"
    run("gpu_kernel.py", *TINY, "--lengths", "40", "100", "--tol", "1e-3", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    kernels = {(r["mode"], r["kernel"]) for r in rows}
    assert {("decode", "lambda"), ("decode", "lambda-as-full"), ("prefill", "lambda")} <= kernels
    run("plot_gpu_kernel.py", str(out), "--out", str(tmp_path / "k.png"))
    assert (tmp_path / "k.png").stat().st_size > 0


def test_gpu_check_cases_pass_on_cpu(tmp_path):
    out = tmp_path / "c.json"
    proc = subprocess.run(  # exits 1: the CUDA-graph check cannot run on CPU
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--only", "decode-split",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1"),
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert "cuda-graph-replay" in results, proc.stderr[-2000:]
    cases = {k: v for k, v in results.items() if k != "cuda-graph-replay"}
    assert len(cases) == 2 and all(v["ok"] for v in cases.values()), cases


def test_gpu_tune_writes_best_settings(tmp_path):
    out = tmp_path / "t.json"
    run("gpu_tune.py", "--n", "40", "--warps", "4", "--stages", "1", "--block-n", "16", "32", *TINY, "--out", str(out))
    best = json.loads(out.read_text())["best"]
    assert set(best) == {"decode", "prefill"} and best["decode"]["BLOCK_N"] in (16, 32)


def test_bad_tuning_override_is_named():
    env = dict(os.environ, LMINF_TRITON_TUNING='{"warps": 4}', PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", "import lminf_vllm.paths.triton.kernels"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "LMINF_TRITON_TUNING must be a JSON object" in proc.stderr
