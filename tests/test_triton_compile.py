"""The Triton kernels compile for a real GPU (sm_90), checked without one.

A subprocess with TRITON_INTERPRET unset, so the kernels are real JIT functions
whatever this process imported before (see tests/triton_compile.py).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_compile.py")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shared["attention"] <= 100 * 1024, shared  # fits every sm_80+ card, with room to spare
    assert shared["merge"] <= 100 * 1024, shared
