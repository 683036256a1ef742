"""Generation quality past the training length through the real engine, on the tiny RoPE model.

A short version of `python benchmarks/generation_quality.py`: four held-out
documents, prefixes of 4x and 8x the model's 256-token training length, 100
generated tokens per prefix, greedy and seeded sampling. Scores (sacreBLEU and
ROUGE-L recall) are pooled over both lengths and all documents: a
100-byte continuation is too short for a stable score on its own.
"""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import generation_quality as gq  # noqa: E402
import quality  # noqa: E402

L = 256
LENGTHS = [4 * L, 8 * L]
# LM-Infinite must keep at least this share of the 1x baseline's ROUGE-L recall
# (full runs: 0.9-1.4x of it from 4x to 32x, see docs/quality.md); stock keeps under a quarter.
NEAR_1X = 0.7
COLLAPSED = 0.25


@pytest.fixture(scope="module")
def result():
    assert quality.training_length(quality.TINY_MODEL) == L
    r = gq.run(
        quality.TINY_MODEL, LENGTHS, ["1x", "stock", "lminf"], docs=4,
        global_tokens=10, local_tokens=L, distance_cap=L, kv_cache_bytes=256 << 20,
    )  # fmt: skip
    for setting in gq.SETTINGS:  # shown with -s: the numbers the margins are held to
        print(setting, {m: {k: scores(r, m, setting)[k] for k in ("bleu", "rouge_l_recall")} for m in r["modes"]})
    return r


def scores(result, mode, setting):
    return gq.pooled(result, mode, setting, LENGTHS)


@pytest.mark.parametrize("setting", gq.SETTINGS)
def test_the_baseline_scores_above_zero(result, setting):
    # Guards the comparisons below against an all-empty or all-garbage run.
    base = scores(result, "1x", setting)
    assert base["rouge_l_recall"] >= 3 and base["bleu"] > 0.3, base


@pytest.mark.parametrize("setting", gq.SETTINGS)
def test_stock_attention_collapses_past_4x(result, setting):
    stock, base = scores(result, "stock", setting), scores(result, "1x", setting)
    assert stock["rouge_l_recall"] <= COLLAPSED * base["rouge_l_recall"], (stock, base)
    assert stock["bleu"] < base["bleu"], (stock, base)


@pytest.mark.parametrize("setting", gq.SETTINGS)
def test_lminf_stays_near_the_1x_baseline_and_beats_stock(result, setting):
    ours, stock, base = (scores(result, m, setting) for m in ("lminf", "stock", "1x"))
    for metric in ("bleu", "rouge_l_recall"):
        assert ours[metric] >= stock[metric], (metric, ours, stock)
    assert ours["rouge_l_recall"] >= NEAR_1X * base["rouge_l_recall"], (ours, base)
    assert ours["bleu"] >= NEAR_1X * base["bleu"], (ours, base)
    # Not stock in disguise: most continuations differ from stock's.
    same = sum(a == b for n in LENGTHS for a, b in zip(result["modes"]["lminf"][setting][n]["texts"],
                                                        result["modes"]["stock"][setting][n]["texts"]))
    assert same <= len(LENGTHS), same


def test_every_continuation_has_its_full_length(result):
    for mode, per_setting in result["modes"].items():
        for setting, per_n in per_setting.items():
            for n, r in per_n.items():
                assert len(r["texts"]) == 4 and all(len(t) >= 50 for t in r["texts"]), (mode, setting, n)
