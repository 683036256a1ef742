"""benchmarks/step_profile.py end to end, tiny: the saturation preset's engine, in process, profiled."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_profile_splits_a_run_past_the_window(tmp_path):
    out = tmp_path / "profile.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--preset", "small", "--prompts", "3",
            "--input-len", "900", "--output-len", "4", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    seconds = report["seconds_under_profile"]
    assert report["wall_s"] > 0 and report["engine"]["lminf"]["local_tokens"] < 900  # prompts past the window
    assert seconds["linear layers (oneDNN matmul)"] > 0
    assert 0 < seconds["attention kernel, called for prefill"] < seconds["lminf prefill past the window (all of it)"]
    assert seconds["attention kernel, called for decode and plain"] > 0
