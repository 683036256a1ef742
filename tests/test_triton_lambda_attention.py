"""The Triton Λ-attention kernel against the dense reference, on CPU.

No GPU is needed: tests/triton_cases.py runs every case in one subprocess under
TRITON_INTERPRET=1 (the interpreter must be chosen before triton is imported,
and this pytest process has usually imported it through vLLM already). Each
case is one call over a batch, with the cache NaN wherever the step may not
read (see triton_cases.py); the tests below only check the reported errors.

Awkward sizes on purpose: lengths 1, 3, 19, 99, 1177 (and 10^6); block sizes 1, 16, 32,
128; G = 0 and G not a multiple of the block size; C below n and C huge;
split-K (segments) forced on, since it is chosen automatically only on a GPU.
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
HUGE = 10**9  # C = huge: no cap

CONFIGS = {  # (G, W, C)
    "cap": (4, 16, 32),
    "window-only": (0, 24, 24),
    "G-not-block-multiple": (10, 7, 9),
    "no-cap": (3, 40, HUGE),
}
ODD = [1, 3, 19, 99]


def _cases():
    cases = {}
    # Fresh prefills of odd lengths, batched in one call.
    prefill_blocks = {"cap": (16, 128), "window-only": (32,), "G-not-block-multiple": (16, 32, 128), "no-cap": (128,)}
    for name, cfg in CONFIGS.items():
        for block_size in prefill_blocks[name]:
            cases[f"prefill-{name}-B{block_size}"] = dict(cfg=cfg, block_size=block_size, lengths=ODD, queries=ODD)
    cases["prefill-W1-C1-B16"] = dict(cfg=(4, 1, 1), block_size=16, lengths=ODD, queries=ODD)  # smallest window
    cases["prefill-G40-W1-B16"] = dict(cfg=(40, 1, 1), block_size=16, lengths=ODD, queries=ODD)  # globals span blocks
    cases["prefill-1177-B32"] = dict(cfg=(10, 64, 100), block_size=32, lengths=[1177], queries=[1177])
    # Decode only (the small-tile path): one query per request, very different lengths.
    lengths = [1, 2, 9, 40, 150, 333]
    for name, block_size in (("cap", 1), ("cap", 16), ("G-not-block-multiple", 16)):
        cases[f"decode-{name}-B{block_size}"] = dict(
            cfg=CONFIGS[name], block_size=block_size, lengths=lengths, queries=[1] * len(lengths)
        )
    # Split-K: key tiles shared among segments, merged by log-sum-exp (some segments empty).
    cases["decode-split3-B16"] = dict(
        cfg=(5, 200, 250), block_size=16, lengths=lengths, queries=[1] * len(lengths), segments=3
    )
    cases["decode-split8-B1"] = dict(cfg=(5, 200, 250), block_size=1, lengths=[333, 2], queries=[1, 1], segments=8)
    # Mixed batches: a chunk starting mid-sequence, a fresh prefill and decodes in one call.
    mixed = dict(lengths=[200, 19, 333, 1, 2, 40, 150], queries=[77, 19, 1, 1, 1, 1, 1])
    for name, cfg in CONFIGS.items():
        cases[f"mixed-{name}-B16"] = dict(cfg=cfg, block_size=16, **mixed)
    cases["mixed-1177-B128"] = dict(
        cfg=CONFIGS["cap"], block_size=128, lengths=[1177, 300, 19, 1, 40], queries=[1, 77, 19, 1, 1]
    )
    # Through the CUDA path's own plan and run (the backend's call): the step's keys
    # written by the path without a host sync, padding tokens' slots of -1 included.
    cases["path-mixed-cap-B16"] = dict(cfg=CONFIGS["cap"], block_size=16, via_path=True, **mixed)
    cases["path-decode-G-not-block-multiple-B16"] = dict(
        cfg=CONFIGS["G-not-block-multiple"], block_size=16, lengths=lengths, queries=[1] * len(lengths), via_path=True
    )
    cases["mixed-split2-interleaved"] = dict(cfg=(5, 100, 150), block_size=16, neox=False, segments=2, **mixed)
    # GQA group sizes and RoPE pair layouts, full and partial rotary (head 80 pads to 128 lanes).
    layouts = [
        ([2, 2, 16], 16, True), ([2, 2, 16], 16, False),  # no GQA, full rotary
        ([8, 2, 32], 16, True), ([8, 2, 32], 16, False),  # GQA 4, half rotary
        ([4, 2, 80], 32, True), ([4, 2, 80], 32, False),  # head 80 (phi-2 like), 32 rotary lanes
        ([16, 2, 16], 16, True),  # GQA 8
    ]  # fmt: skip
    for heads, rotary_dim, neox in layouts:
        H, Hkv, D = heads
        cases[f"mixed-H{H}-Hkv{Hkv}-D{D}-rot{rotary_dim}-{'neox' if neox else 'interleaved'}"] = dict(
            cfg=(5, 20, 30), block_size=32, heads=heads, rotary_dim=rotary_dim, neox=neox,
            lengths=[99, 19, 333, 3], queries=[40, 19, 1, 1],
        )  # fmt: skip
    # Chunked prefill, then decode: one request, one call per step.
    for name in ("cap", "G-not-block-multiple"):
        cases[f"steps-{name}-B16"] = dict(
            cfg=CONFIGS[name], block_size=16, lengths=[300], steps=[5, 64, 1, 130, 33, 63, 1, 1, 1, 1]
        )
    # Far positions (a 1M-token request; only its globals and window exist): the
    # re-rotation angles reach 1e6 rad, which float32 angles would get wrong by ~1e-2.
    cases["far-1M-B128"] = dict(far=1_000_003, queries=3, cfg=(4, 16, 32), block_size=128)
    cases["far-100k-interleaved-partial-split2"] = dict(
        far=100_003, queries=1, cfg=(10, 40, 64), block_size=16, heads=[8, 2, 32], rotary_dim=16, neox=False,
        segments=2,
    )  # fmt: skip
    cases["mixed-float16"] = dict(
        cfg=(4, 16, 32), block_size=16, dtype="float16", lengths=[99, 19, 333, 1], queries=[40, 19, 1, 1]
    )
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def results(request):
    """Run the selected cases in one interpreter subprocess: {case id: {"err"} or {"error"}}."""
    selected = [
        item.callspec.params["case_id"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    ]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_cases.py")],
        input=json.dumps([CASES[c] for c in selected]),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(zip(selected, json.loads(proc.stdout)))


@pytest.mark.parametrize("case_id", list(CASES))
def test_kernel_matches_dense_reference(results, case_id):
    result = results[case_id]
    assert "error" not in result, result.get("error")
    tol = 1e-2 if CASES[case_id].get("dtype") == "float16" else 1e-3  # float16 rounds q, k, v themselves
    assert result["err"] < tol, f"{case_id}: max |kernel - reference| = {result['err']:.3g}"
