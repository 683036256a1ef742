"""The row-routing rule (routing.py) against a brute-force reading of SPEC.md."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lminf_vllm.config import LminfConfig
from lminf_vllm.routing import Rows, is_plain, row_kind, row_runs


def brute_force_kind(i: int, cfg: LminfConfig) -> Rows:
    """Classify row i from the visible keys and the distances the model is shown."""
    G, W, C = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    visible = [j for j in range(i + 1) if j < G or i - j < W]
    if len(visible) == i + 1 and all(min(i - j, C) == i - j for j in visible):
        return Rows.ALL_KEYS
    if G == 0:
        return Rows.NO_GLOBALS
    outside = [j for j in range(min(G, i + 1)) if i - j >= W]  # globals outside the window
    if len(outside) < G:
        return Rows.GLOBALS_IN_WINDOW
    if all(i - j <= C for j in outside):  # (at i - j == C the cap changes nothing: either kind is exact)
        return Rows.TRUE_DISTANCE
    if all(i - j >= C for j in outside):
        return Rows.CAPPED
    return Rows.SOME_CAPPED


configs = st.builds(
    lambda g, w, extra: LminfConfig(global_tokens=g, local_tokens=w, distance_cap=w + extra),
    st.integers(0, 12), st.integers(1, 40), st.integers(0, 40),
)


@settings(max_examples=2000)
@given(configs, st.integers(0, 120))
def test_row_kind_matches_brute_force(cfg, i):
    assert row_kind(i, cfg) == brute_force_kind(i, cfg)


@given(configs, st.integers(0, 300), st.integers(1, 200))
def test_runs_cover_the_range_in_order_and_agree_with_row_kind(cfg, first, length):
    runs = row_runs(first, first + length, cfg)
    assert runs[0][0] == first and runs[-1][1] == first + length
    assert all(a < b for a, b, _ in runs) and all(r[1] == s[0] for r, s in zip(runs, runs[1:]))
    assert all(r[2] != s[2] for r, s in zip(runs, runs[1:]))  # neighbours differ: runs are maximal
    for a, b, kind in runs:
        assert {row_kind(i, cfg) for i in (a, b - 1)} == {kind}


@settings(max_examples=500)
@given(configs, st.integers(1, 120))
def test_plain_means_every_row_sees_every_key_at_its_true_distance(cfg, n):
    assert is_plain(n, cfg) == all(brute_force_kind(i, cfg) is Rows.ALL_KEYS for i in range(n))


def test_known_boundaries():
    cfg = LminfConfig(global_tokens=4, local_tokens=40, distance_cap=64)
    assert row_runs(0, 200, cfg) == [
        (0, 44, Rows.ALL_KEYS), (44, 65, Rows.TRUE_DISTANCE), (65, 67, Rows.SOME_CAPPED), (67, 200, Rows.CAPPED)
    ]  # fmt: skip
    assert row_runs(0, 100, LminfConfig(3, 64, 20)) == [
        (0, 21, Rows.ALL_KEYS), (21, 66, Rows.GLOBALS_IN_WINDOW), (66, 100, Rows.CAPPED)
    ]  # fmt: skip
    assert row_runs(5, 300, LminfConfig(0, 48, 48)) == [(5, 48, Rows.ALL_KEYS), (48, 300, Rows.NO_GLOBALS)]
