"""A short soak of the real server (the long version: benchmarks/soak.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import soak  # noqa: E402

from conftest import TABLE  # noqa: E402

pytestmark = pytest.mark.slow  # second tier (`make test-all`): a served engine streamed through hang-ups: about 40 s


def test_streams_past_the_context_with_hang_ups_and_flat_memory(tiny_llama, tmp_path):
    args = soak.parse_args([
        "--model", str(tiny_llama), "--rounds", "4", "--concurrency", "16", "--tokens", "300",
        "--disconnect-every", "4", "--out", str(tmp_path / "soak.json"),
    ])  # fmt: skip
    report = soak.run(args)
    assert report["problems"] == []
    assert args.tokens + 30 > 2 * TABLE  # each stream runs far past the RoPE table
    for r in report["rounds"]:
        assert r["hung_up"] == 4 and r["completed"] == 12 == r["complete_with_all_tokens"]
        assert r["healthy_after"]
