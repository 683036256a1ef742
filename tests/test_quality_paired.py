"""benchmarks/quality_paired.py's interval: a paired bootstrap over runs of tokens."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality_paired import paired_interval  # noqa: E402


def test_the_interval_brackets_a_known_shift_and_narrows_with_more_tokens():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 8192, generator=g, dtype=torch.float64)
    lo, hi = paired_interval(0.01 + 0.05 * noise, 64, 2000)
    assert lo < 0.01 < hi
    lo_half, hi_half = paired_interval(0.01 + 0.05 * noise[:, :2048], 64, 2000)
    assert hi - lo < hi_half - lo_half


def test_no_difference_gives_a_zero_interval_and_a_tail_shorter_than_a_run_is_left_out():
    diff = torch.zeros(2, 130, dtype=torch.float64)
    diff[:, 128:] = 5.0  # the last 2 tokens of each document make no whole run of 64
    assert paired_interval(diff, 64, 100) == (0.0, 0.0)
