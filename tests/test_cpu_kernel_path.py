"""The CPU-kernel path (paths/cpu_kernel) against the dense reference.

Steps are simulated as the engine runs them: a batch of requests of different
lengths, each fed in prefill chunks then decoded token by token, in one cache
in the kernel's layout with permuted blocks and large random values in every
slot nobody wrote (vLLM zero-fills a new cache, so slots hold finite values:
the kernel, like vLLM's own use of it, relies on that).
Each step is the path's own `plan` and `run`, exactly what the backend calls.
"""

import pytest
import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.paths import cpu_kernel
from lminf_vllm.paths.cpu_kernel import prefill
from lminf_vllm.paths.cpu_kernel.decode import Copies, placement, plan_calls
from lminf_vllm.cpu_attention_kernel import write_kv_kernel
from lminf_vllm.paths.cpu_kernel.ops import kernel_mode
from lminf_vllm.rope import RotarySpec, cos_sin, default_inv_freq, rotate
from lminf_vllm.routing import Rows
from lminf_vllm.step import EngineShape, LayerMath, StepBatch
from lminf_vllm.testing.reference import dense_lambda_attention

H, HKV, D = 4, 2, 32

ISA = kernel_mode("cpu", True, torch.float32, 32, HKV, D)
pytestmark = pytest.mark.skipif(ISA is None, reason="vLLM's CPU attention kernel is not available here")

CONFIGS = [
    LminfConfig(global_tokens=4, local_tokens=40, distance_cap=64),
    LminfConfig(global_tokens=0, local_tokens=48, distance_cap=48),  # sliding window only
    LminfConfig(global_tokens=10, local_tokens=37, distance_cap=41),  # W + G - 1 > C: some decodes fall back
    LminfConfig(global_tokens=40, local_tokens=50, distance_cap=60),  # G > B: globals span two blocks
    LminfConfig(global_tokens=3, local_tokens=64, distance_cap=20),  # C < W: every global distance capped
]


def sequence(n, seed, neox, cfg):
    """Queries and keys as the model hands them over (rotated), values, and the reference output."""
    g = torch.Generator().manual_seed(seed)
    q0, k0, v = (torch.randn(n, h, D, generator=g) * 1.5 for h in (H, HKV, HKV))
    rotary = RotarySpec(default_inv_freq(100.0, D), D, neox)
    cos, sin = cos_sin(torch.arange(n), rotary.inv_freq, torch.float32)
    q = rotate(q0, cos[:, None], sin[:, None], rotary)
    k = rotate(k0, cos[:, None], sin[:, None], rotary)
    expected = dense_lambda_attention(q0.double(), k0.double(), v.double(), cfg, rotary, D**-0.5)
    return q, k, v, rotary, expected


def run_batch(cfg, block_size, schedules, neox=True, dtype=torch.float32, plans=None):
    """schedules[r]: request r's query counts per step (0 = not scheduled); each step's plan
    is appended to `plans` if given. Returns (max |out - ref|, query rows per way, summed over the steps)."""
    B = block_size
    seqs = [sequence(sum(s), r, neox, cfg) for r, s in enumerate(schedules)]
    layer = LayerMath(D**-0.5, seqs[0][3], None)
    shape = EngineShape(cfg, "cpu", B, H, HKV, D, dtype, rope=True)
    assert cpu_kernel.available(shape)
    need = [-(-sum(s) // B) for s in schedules]
    pool = sum(need) + 4
    kv_cache = (torch.randn(pool, HKV, B, 2 * D, generator=torch.Generator().manual_seed(1)) * 1e3).to(dtype)
    # Block 0 is vLLM's null block: never a request's (the kernel path uses it as scratch).
    free = [b for b in torch.randperm(pool, generator=torch.Generator().manual_seed(B)).tolist() if b]
    table = torch.zeros(len(schedules), max(need), dtype=torch.int32)
    for r, m in enumerate(need):
        table[r, :m] = torch.tensor([free.pop() for _ in range(m)])
    done = [0] * len(schedules)
    worst, served = 0.0, {}
    for step in range(max(len(s) for s in schedules)):
        counts = [s[step] if step < len(s) else 0 for s in schedules]
        reqs = [r for r, t in enumerate(counts) if t]
        pieces = [[seqs[r][x][done[r] : done[r] + counts[r]] for r in reqs] for x in range(3)]
        query, key, value = (torch.cat(p).to(dtype) for p in pieces)
        pos = [torch.arange(done[r], done[r] + counts[r]) for r in reqs]
        slots = torch.cat([table[r][p // B].long() * B + p % B for r, p in zip(reqs, pos)])
        qsl = torch.tensor([0] + [counts[r] for r in reqs]).cumsum(0).to(torch.int32)
        seq_lens = torch.tensor([done[r] + counts[r] for r in reqs], dtype=torch.int32)
        batch = StepBatch(num_tokens=len(query), num_reqs=len(reqs), query_start_loc=qsl, query_start_loc_cpu=qsl,
                          seq_lens=seq_lens, block_table=table[reqs], slot_mapping=slots,
                          max_query_len=max(counts), max_seq_len=int(seq_lens.max()))  # fmt: skip
        plan = cpu_kernel.plan(batch, shape)
        if plans is not None:
            plans.append(plan)
        for way, rows in plan.rows_served.items():
            served[way] = served.get(way, 0) + rows
        output = torch.full_like(query, float("nan"))
        cpu_kernel.run(plan, layer, query, key, value, kv_cache, output)
        for idx, r in enumerate(reqs):
            a, t = int(qsl[idx]), counts[r]
            got = output[a : a + t].double()
            ref = seqs[r][4][done[r] : done[r] + t]
            assert torch.isfinite(got).all(), f"request {r} step {step}: non-finite output"
            worst = max(worst, (got - ref).abs().max().item())
            done[r] += t
    return worst, {k: v for k, v in served.items() if v}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", ","))
@pytest.mark.parametrize("block_size", [32, 64])
def test_mixed_batch_of_prefills_and_decodes_matches_reference(cfg, block_size):
    schedules = [
        [1] * 130,  # a one-token prompt, then decoding
        [3] + [1] * 129,
        [19, 0, 0, 80] + [1] * 126,  # joins late, prefill chunk straddling blocks
        [99, 200] + [1] * 128,  # long chunks past the window, then decode past it
        [0, 0, 7, 1, 1, 177] + [1] * 124,
    ]
    worst, served = run_batch(cfg, block_size, schedules)
    assert worst < 2e-5
    assert served["cpu_kernel plain"] > 0, served
    if cfg.global_tokens:  # rows with only some globals capped, or some inside the window past C: PyTorch math
        assert served["pytorch"] > 0, served
    if cfg.global_tokens < block_size:  # else no decode's globals fit in one block: the torch path
        assert served.get("cpu_kernel after", 0) + served.get("cpu_kernel front", 0) > 300, served
    if 0 < cfg.global_tokens <= block_size // 2:  # some decodes' G slots after the query leave its block
        assert served["cpu_kernel front"] > 0, served
    # Prefill chunks past the window go through the kernel on a scratch cache (prefill.py).
    assert served.get("cpu_kernel prefill " + ("capped" if cfg.global_tokens else "no_globals"), 0) > 200, served
    if cfg.global_tokens:  # the early rows of a prompt that runs past the window
        assert served.get("cpu_kernel prefill all_keys", 0) > 20, served


def test_prefill_past_the_cap_takes_the_next_kernel_head_size_or_falls_back():
    assert prefill.scratch_head_size(Rows.CAPPED, 64) == 80  # one channel more: 64 -> 80, not 128
    assert prefill.scratch_head_size(Rows.CAPPED, 128) == 160
    assert prefill.scratch_head_size(Rows.TRUE_DISTANCE, 64) == 64
    assert prefill.kernel_isa(Rows.CAPPED, torch.float32, 32, D) is not None
    assert prefill.kernel_isa(Rows.CAPPED, torch.float32, 32, 512) is None  # no size above 512 in the kernel
    assert prefill.kernel_isa(Rows.TRUE_DISTANCE, torch.float32, 32, 512) is not None
    assert prefill.kernel_isa(Rows.SOME_CAPPED, torch.float32, 32, D) is None


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
def test_long_decode_far_past_the_cap_matches_reference(neox):
    cfg = LminfConfig(global_tokens=5, local_tokens=64, distance_cap=96)
    worst, served = run_batch(cfg, 32, [[600] + [1] * 400, [1177] + [1] * 20], neox=neox)
    assert worst < 2e-5
    assert served["cpu_kernel after"] > 300 and served["cpu_kernel front"] > 20, served


def test_bfloat16_cache_matches_reference_to_its_precision():
    """vLLM serves bfloat16 models on CPU with the same kernel and cache layout."""
    assert kernel_mode("cpu", True, torch.bfloat16, 32, HKV, D) == ISA
    cfg = LminfConfig(global_tokens=4, local_tokens=64, distance_cap=96)
    worst, served = run_batch(cfg, 32, [[300] + [1] * 100, [5] + [1] * 150], dtype=torch.bfloat16)
    assert worst < 0.05  # bfloat16 keeps 8 bits of mantissa: outputs of size ~1 move by ~1e-2
    assert served["cpu_kernel after"] > 100 and served["cpu_kernel front"] > 10, served


def test_cpu_prefill_benchmark_runs(tmp_path):
    """benchmarks/cpu_prefill.py end to end, tiny; its two lminf paths must agree."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "p.json"
    args = ["--lengths", "300", "--chunk", "120", "--local-tokens", "64", "--distance-cap", "96", "--repeats", "1"]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "cpu_prefill.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["prompt"] == 300 and row["kernel_us_per_query"] > 0 and row["stock_us_per_query"] > 0
    assert row["max_diff_kernel_vs_torch"] < 1e-4


def test_long_prefill_step_is_split_into_several_kernel_calls(monkeypatch):
    """A very long step (no chunked prefill) runs as several calls of whole pieces."""
    monkeypatch.setattr(prefill, "QUERIES_PER_CALL", 50)  # pieces of W = 40: one per call
    calls, run = [], prefill._run_call
    monkeypatch.setattr(prefill, "_run_call", lambda call, *a: calls.append(call) or run(call, *a))
    cfg = LminfConfig(global_tokens=4, local_tokens=40, distance_cap=64)
    worst, served = run_batch(cfg, 32, [[700] + [1] * 5, [0, 333] + [1] * 4])
    assert worst < 2e-5
    assert served["cpu_kernel prefill capped"] == (700 - 67) + (333 - 67), served  # capped from C + G - 1 = 67
    capped = [len(c.query_rows) for c in calls if c.kind is Rows.CAPPED]
    assert max(capped) == 40 and len(capped) > 20, capped


def test_a_steps_prefill_chunks_share_one_kernel_call_per_kind(monkeypatch):
    """Chunks of several requests past the window, in one step: one call per row kind and layer
    (their pieces as virtual sequences of one scratch cache), still exact."""
    calls, run = [], prefill._run_call
    monkeypatch.setattr(prefill, "_run_call", lambda call, *a: calls.append(call) or run(call, *a))
    cfg = LminfConfig(global_tokens=4, local_tokens=40, distance_cap=64)
    # Four requests prefill in the same steps, in chunks of different sizes, crossing block edges.
    schedules = [[120, 37, 90] + [1] * 3, [33, 100, 61] + [1] * 3, [0, 150, 45] + [1] * 3, [70, 70, 70] + [1] * 3]
    worst, served = run_batch(cfg, 32, schedules)
    assert worst < 2e-5
    capped = [c for c in calls if c.kind is Rows.CAPPED]
    assert max(len(c.global_blocks) for c in capped) == 4, "the third step's four chunks in one call"
    assert served["cpu_kernel prefill capped"] > 300, served


def test_front_rows_share_the_batch_call_on_scratch_blocks():
    """Front rows' copies end a scratch block: the null block, then another decode row's last
    block past its query and its own copies; a front row left without one has a call of its own."""
    cfg, B = LminfConfig(global_tokens=4, local_tokens=64, distance_cap=96), 32
    # i = 200 ("after": its copies at 201..204, block offset 8..12, free from 13: room 19);
    # i = 220, 221, 222: "front" (G + 3, G + 2, G + 1 copies)
    rows = [(0, 0, 1, 201), (1, 1, 1, 221), (2, 2, 1, 222), (3, 3, 1, 223)]
    assert [placement(n - 1, cfg, B) for _, _, _, n in rows] == ["after", "front", "front", "front"]
    table = torch.arange(1, 1 + 4 * 8, dtype=torch.int32).view(4, 8)
    calls, copies = plan_calls(rows[:1], rows[1:], table, cfg, B, ISA, H, HKV, D, torch.float32)
    # Two scratch blocks (the null block, request 0's last block): the two rows with most copies share the call.
    assert len(calls) == 2 and calls[0].tokens is None and calls[0].query_start_loc.tolist() == [0, 1, 2, 3]
    assert calls[0].block_table[1, 0] == 0 and calls[0].block_table[2, 0] == table[0, 200 // B]
    assert calls[1].token_start == 3 and calls[1].block_table[0, 0] == 0 and calls[0].window == calls[1].window == 68
    assert calls[0].copies == (0, 4 + 7 + 6) and calls[1].copies == (17, 17 + 5)
    slots = copies.slots.tolist()
    assert slots[:4] == [table[0, 6] * B + 9 + e for e in range(4)]  # after i = 200 (block 6, row 8)
    assert slots[4:11] == list(range(B - 7, B)) and slots[17:] == list(range(B - 5, B))  # the null block's end
    assert slots[11:17] == [table[0, 6] * B + B - 6 + e for e in range(6)]  # request 0's last block's end
    assert copies.shift.tolist()[:4] == [200 - j - 96 for j in range(4)]


def test_plain_chunk_ending_where_the_last_global_leaves_the_window():
    """A chunk whose last row is i = W + G - 1 still sees every key at its true
    distance (plain), though every global is already outside that row's window:
    it must join the shared call as a plain row, not as a decode row with copies."""
    cfg = LminfConfig(global_tokens=4, local_tokens=40, distance_cap=64)
    worst, served = run_batch(cfg, 32, [[44] + [1] * 20, [100] + [1] * 20, [3, 41] + [1] * 19])
    assert worst < 2e-5
    assert served["cpu_kernel plain"] >= 44 + 41, served


def test_many_front_rows_in_one_step_match_reference():
    """Rows decoding in step, all at the same offset of their last block, are "front" rows together
    and none has room for another's copies: the first takes the null block in the shared call, each
    other one a call of its own (their copies gathered once per layer); still exact."""
    cfg = LminfConfig(global_tokens=4, local_tokens=40, distance_cap=64)
    worst, served = run_batch(cfg, 32, [[90] + [1] * 40] * 3 + [[91] + [1] * 40, [0, 75] + [1] * 39])
    assert worst < 2e-5
    assert served["cpu_kernel front"] >= 3 * 4 * 2, served  # at least two block ends with 3+ front rows


def test_many_front_rows_of_different_lengths_share_one_call_amid_prefill_chunks():
    """Twelve decode rows at twelve offsets of their last block cross block edges in turn, a
    third of them "front" rows at a time, in steps that also carry prefill chunks (within and past
    the window): the front rows find scratch blocks in the others' last blocks and share the
    step's one call; still exact."""
    cfg = LminfConfig(global_tokens=4, local_tokens=40, distance_cap=64)
    decoding = [[84 + 2 * k] + [1] * 48 for k in range(12)]  # i % 32 runs over 24 offsets, 2 apart
    prefilling = [[0] * 10 + [30, 30, 25] + [1] * 36, [0] * 20 + [150, 40] + [1] * 27]
    plans = []
    worst, served = run_batch(cfg, 32, decoding + prefilling, plans=plans)
    assert worst < 2e-5
    assert served["cpu_kernel front"] >= 60 and served["cpu_kernel prefill capped"] > 100, served
    fronts = [p.rows_served.get("cpu_kernel front", 0) for p in plans]
    assert min(len(p.calls) for p, f in zip(plans, fronts) if f >= 3) == 1  # every front row in the shared call
    assert any(p.prefills is not None and f >= 3 and len(p.calls) == 1 for p, f in zip(plans, fronts)), fronts


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [D, D // 2], ids=["full", "partial"])
def test_copies_are_rotated_bit_for_bit_as_rope_rotates(neox, rotary_dim):
    """The copies' rotation (three elementwise ops) is rope.rotate's, to the bit."""
    g = torch.Generator().manual_seed(3)
    k, shift = torch.randn(40, HKV, D, generator=g), torch.randint(0, 1 << 20, (40,), generator=g)
    rotary = RotarySpec(default_inv_freq(10000.0, rotary_dim), rotary_dim, neox)
    unused = torch.zeros(1, dtype=torch.long)
    cos, sin = cos_sin(shift, rotary.inv_freq, torch.float32)
    expected = rotate(k, cos[:, None], sin[:, None], rotary)
    assert torch.equal(Copies(unused, unused, unused, unused, shift).rotated(k, rotary), expected)
