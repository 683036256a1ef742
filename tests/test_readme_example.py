"""The README's Python example, run exactly as printed (a script of its own, vLLM's defaults)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # second tier (`make test-all`): SmolLM2 compiled with vLLM's defaults in a fresh process: about 115 s

ROOT = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_as_pasted(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_python_example())
    # A user's shell: none of the test suite's engine settings (in-process engine, no thread binding).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LMINF_"))}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    printed = proc.stdout.strip().splitlines()
    assert printed and len(printed[-1].split()) >= 5, proc.stdout[-2000:]  # the completion: some words of text
