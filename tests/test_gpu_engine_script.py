"""benchmarks/gpu_engine.py, dry-run on CPU: every section runs through vllm.LLM
(CPU_ATTN in place of FLASH_ATTN, tiny sizes) and engine.json has issue 14's schema.

The GPU run itself needs the H200 and the bundle (benchmarks/gpu_bundle.py);
this checks that the script's logic holds end to end before device time is spent.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # second tier (`make test-all`): the GPU script's CPU dry run: about 50 s

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-3
ROW_KEYS = {"backend", "prompt_tokens", "batch", "prefill_tok_s", "decode_tok_s", "kv_blocks_per_seq"}


def test_dry_run_writes_the_issue_14_schema(tmp_path):
    out = tmp_path / "engine.json"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind",
               TOKENIZERS_PARALLELISM="false", VLLM_LOGGING_LEVEL="WARNING")  # fmt: skip
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_engine.py"), "--dry-run", "--out", str(out),
           "--work", str(tmp_path / "work")]  # fmt: skip
    # Under ~90 s on an idle 2-core machine; the limit leaves room for a busy one.
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())

    assert data["errors"] == {}, data["errors"]
    assert data["vllm_version"] and data["gpu"] and data["dry_run"] is True

    ex = data["exactness"]
    assert ex["n_le_w_max_logprob_diff"] < TOLERANCE
    assert ex["n_le_w_tokens_equal"] is True
    assert ex["reference_max_logprob_diff"] < TOLERANCE
    assert max(ex["reference_prompt_lengths"]) >= 8 * ex["rope_table"]
    assert ex["greedy_past_table_equal"] is True
    assert min(ex["greedy_tokens_past_table"]) > 0
    b24 = ex["block24"]
    assert b24["matches"] is True and b24["pool_blocks"] == 24
    assert (b24["prompt_tokens"] + b24["generated"]) / b24["block_size"] > 24  # more tokens than the pool holds

    cg = data["cuda_graphs"]
    assert cg["tokens_equal_eager"] is True
    assert cg["decode_tok_s_graphs"] > 0 and cg["decode_tok_s_eager"] > 0

    rows = data["throughput"]
    measured = [r for r in rows if "skipped" not in r]
    assert {r["backend"] for r in measured} == {"CPU_ATTN", "lminf"}
    for r in measured:
        assert ROW_KEYS <= set(r), r
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    # the largest-batch row at the "64k" length, for each backend
    for backend in ("CPU_ATTN", "lminf"):
        assert any(r["backend"] == backend and r["batch"] > 2 for r in rows), rows
