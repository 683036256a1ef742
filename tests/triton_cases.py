"""Runs Triton Λ-attention cases against the dense reference; prints JSON errors.

Run as a script (tests/test_triton_lambda_attention.py does, in a subprocess):
TRITON_INTERPRET must be set before triton is imported, and the pytest process
has usually imported triton already (through vLLM). Without a GPU the kernel
runs in Triton's interpreter on CPU tensors. With LMINF_TRITON_DEVICE=cuda the
same cases run compiled on a GPU (benchmarks/gpu_check.py): everything is built
on the CPU as before and only the kernel's inputs travel to the GPU.

    stdin:  JSON list of cases (see `run_case`)
    stdout: JSON list of {"err": max |kernel - reference|} or {"error": traceback}

Every case is one call over a batch of requests, or one request fed in
several steps, or one request at a far position (checked against a reference
built from relative distances only, since a dense one cannot reach 10^6).
The cache is NaN everywhere a query of the step may not read: unwritten rows,
positions outside the globals and the window, and freed table entries, which
point at a shared all-NaN block as reused ids would.
"""

import json
import os
import sys
import traceback

DEVICE = os.environ.get("LMINF_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from lminf_vllm.config import LminfConfig  # noqa: E402
from lminf_vllm.testing.reference import dense_lambda_attention  # noqa: E402
from lminf_vllm.rope import RotarySpec, cos_sin, default_inv_freq, rotate  # noqa: E402
from lminf_vllm.paths import triton as triton_path  # noqa: E402
from lminf_vllm.paths.triton.kernels import triton_lambda_attention  # noqa: E402
from lminf_vllm.step import EngineShape, LayerMath, StepBatch  # noqa: E402


def make_request(n, H, Hkv, D, rotary, gen):
    """Unrotated q0/k0/v (for the reference) and q/k rotated at true positions."""
    q0, k0, v = (torch.randn(n, h, D, generator=gen, dtype=torch.float64) * 1.5 for h in (H, Hkv, Hkv))
    cos, sin = cos_sin(torch.arange(n), rotary.inv_freq, torch.float64)
    q = rotate(q0, cos[:, None], sin[:, None], rotary)
    k = rotate(k0, cos[:, None], sin[:, None], rotary)
    return q0, k0, v, q, k


def launch(cache, reqs, steps, cfg, rotary, dtype, H, D, padding, segments=None, via_path=False):
    """One kernel launch: request r has seq_len reqs[r]["n"] after the step and
    steps[r] queries in it; its keys the step may read are written first.
    via_path: the step's own keys are not written here but handed, with the
    padding tokens' slots of -1, to the CUDA path's plan and run (as the backend does)."""
    B = cache.shape[2]
    poison = cache.shape[0] - 1  # the all-NaN block freed table entries point to
    width = max(-(-r["n"] // B) for r in reqs) + 2
    table = torch.full((len(reqs) + 1, width), poison, dtype=torch.int32)
    qs, starts, seq_lens, step_kv, slots = [], [0], [], [], []
    for r, (req, q_len) in enumerate(zip(reqs, steps)):
        n = req["n"]
        first = n - q_len
        for p in range(n):  # the keys some query of this step sees
            if p < cfg.global_tokens or p >= first - cfg.local_tokens + 1:
                blk, row = req["blocks"][p // B], p % B
                table[r, p // B] = blk
                if via_path and p >= first:
                    step_kv.append((req["k"][p], req["v"][p]))
                    slots.append(blk * B + row)
                    continue
                cache[blk, :, row, :D] = req["k"][p].to(dtype)
                cache[blk, :, row, D:] = req["v"][p].to(dtype)
        qs.append(req["q"][first:n] if "q" in req else req["q_tail"])
        starts.append(starts[-1] + q_len)
        seq_lens.append(n)
    # A padded batch as vLLM's CUDA graphs see it: an empty request, extra tokens.
    starts.append(starts[-1])
    seq_lens.append(0)
    q = torch.cat(qs + [torch.zeros(padding, H, D, dtype=torch.float64)]).to(dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    if via_path:
        Hkv = cache.shape[1]
        blank = torch.zeros(padding, Hkv, D, dtype=torch.float64)
        key = torch.cat([torch.stack([k for k, _ in step_kv]), blank]).to(dtype)
        value = torch.cat([torch.stack([v for _, v in step_kv]), blank]).to(dtype)
        qsl = torch.tensor(starts, dtype=torch.int32)
        batch = StepBatch(
            num_tokens=starts[-1], num_reqs=len(seq_lens), query_start_loc=qsl.to(DEVICE), query_start_loc_cpu=qsl,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_table=table.to(DEVICE),
            slot_mapping=torch.tensor(slots + [-1] * padding, device=DEVICE), max_query_len=max(steps),
            max_seq_len=max(seq_lens),
        )  # fmt: skip
        shape = EngineShape(cfg, "cuda", B, H, Hkv, D, dtype, rope=True)
        layer = LayerMath(D**-0.5, rotary, None, rotary.inv_freq.to(DEVICE))
        device_cache = cache.to(DEVICE)
        triton_path.run(triton_path.plan(batch, shape), layer, q.to(DEVICE), key.to(DEVICE), value.to(DEVICE),
                        device_cache, out)  # fmt: skip
        return out.cpu(), starts
    triton_lambda_attention(
        q.to(DEVICE), cache.to(DEVICE), out,
        torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), table.to(DEVICE),
        cfg, D**-0.5, rotary.inv_freq.to(DEVICE), rotary.rotary_dim, rotary.is_neox_style,
        decode_only=all(s == 1 for s in steps), num_segments=segments,
    )  # fmt: skip
    return out.cpu(), starts


def run_case(case):
    """case: {"cfg": [G, W, C], "block_size", "lengths": [n, ...], "queries": [q_len, ...]
    (one call) or "steps": [chunk, ...] (one request, one call per chunk),
    "heads": [H, Hkv, D], "rotary_dim", "neox", "dtype", "seed", "segments" (split-K)}"""
    G, W, C = case["cfg"]
    cfg = LminfConfig(global_tokens=G, local_tokens=W, distance_cap=C)
    H, Hkv, D = case.get("heads", [4, 2, 16])
    rot_dim = case.get("rotary_dim", D)
    rotary = RotarySpec(default_inv_freq(100.0, rot_dim), rot_dim, case.get("neox", True))
    dtype = getattr(torch, case.get("dtype", "float32"))
    B = case["block_size"]
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    lengths = case["lengths"]
    n_blocks = [-(-n // B) for n in lengths]
    pool = sum(n_blocks) + 3
    # Permuted physical blocks; block 0 is vLLM's null block, never a request's
    # (the CUDA path writes padding tokens there).
    order = (torch.randperm(pool - 1, generator=gen) + 1).tolist()
    cache = torch.full((pool + 1, Hkv, B, 2 * D), float("nan"), dtype=dtype)
    reqs, expected = [], []
    for n, nb in zip(lengths, n_blocks):
        q0, k0, v, q, k = make_request(n, H, Hkv, D, rotary, gen)
        reqs.append({"n": n, "q": q, "k": k, "v": v, "blocks": [order.pop() for _ in range(nb)]})
        expected.append(dense_lambda_attention(q0, k0, v, cfg, rotary, D**-0.5))

    if "steps" in case:  # one request fed chunk by chunk, one call per chunk
        (req,), full, outs, done = reqs, reqs[0]["n"], [], 0
        for chunk in case["steps"]:
            done += chunk
            out, _ = launch(cache, [dict(req, n=done)], [chunk], cfg, rotary, dtype, H, D, padding=0)
            outs.append(out)
        assert done == full
        got, want = torch.cat(outs), expected[0]
    else:
        out, starts = launch(cache, reqs, case["queries"], cfg, rotary, dtype, H, D, 5, case.get("segments"),
                             via_path=case.get("via_path", False))  # fmt: skip
        got = out[: starts[len(reqs)]]
        want = torch.cat([e[n - q_len :] for e, n, q_len in zip(expected, lengths, case["queries"])])
    return float((got.double() - want).abs().max())


def relative_reference(q0, k0, v, positions, cfg, rotary, scale):
    """SPEC.md for queries q0 [T, H, D] at `positions`, keys k0/v given as dicts
    position -> [Hkv, D] (unrotated): score = <R(d) q0_i, k0_j>, the same as
    <R(j + d) q0_i, R(j) k0_j>, so no rotation ever uses a large angle here."""
    G, W, C = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    group = q0.shape[1] // next(iter(k0.values())).shape[0]
    out = []
    for q, i in zip(q0, positions):
        keys = [j for j in range(min(G, i + 1))] + [j for j in range(max(0, i - W + 1), i + 1) if j >= G]
        d = torch.tensor([i - j if i - j < W else min(i - j, C) for j in keys])
        cos, sin = cos_sin(d, rotary.inv_freq, torch.float64)
        q_rot = rotate(q[None], cos[:, None], sin[:, None], rotary)  # [K, H, D]
        k = torch.stack([k0[j] for j in keys]).repeat_interleave(group, dim=1)
        probs = torch.softmax((q_rot * k).sum(-1) * scale, dim=0)  # [K, H]
        out.append(torch.einsum("kh,khd->hd", probs, torch.stack([v[j] for j in keys]).repeat_interleave(group, dim=1)))
    return torch.stack(out)


def run_far_case(case):
    """One request at a far position ("far": n tokens), its last "queries" in one call.
    Only the globals and the window exist: vectors for other positions are never made."""
    G, W, C = case["cfg"]
    cfg = LminfConfig(global_tokens=G, local_tokens=W, distance_cap=C)
    H, Hkv, D = case.get("heads", [4, 2, 16])
    rot_dim = case.get("rotary_dim", D)
    rotary = RotarySpec(default_inv_freq(100.0, rot_dim), rot_dim, case.get("neox", True))
    B, n, q_len = case["block_size"], case["far"], case["queries"]
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    first = n - q_len
    needed = sorted(set(range(min(G, n))) | set(range(max(0, first - W + 1), n)))
    pos = torch.tensor(needed)
    k0, v = (torch.randn(len(needed), Hkv, D, generator=gen, dtype=torch.float64) * 1.5 for _ in range(2))
    q0 = torch.randn(q_len, H, D, generator=gen, dtype=torch.float64) * 1.5
    cos, sin = cos_sin(pos, rotary.inv_freq, torch.float64)
    k = rotate(k0, cos[:, None], sin[:, None], rotary)
    q = rotate(q0, cos[-q_len:, None], sin[-q_len:, None], rotary)
    blocks = sorted({p // B for p in needed})
    order = torch.randperm(len(blocks) + 3, generator=gen).tolist()
    req = {
        "n": n,
        "q_tail": q,
        "k": dict(zip(needed, k)),
        "v": dict(zip(needed, v)),
        "blocks": {b: order.pop() for b in blocks},
    }
    dtype = getattr(torch, case.get("dtype", "float32"))
    cache = torch.full((len(blocks) + 4, Hkv, B, 2 * D), float("nan"), dtype=dtype)
    out, _ = launch(cache, [req], [q_len], cfg, rotary, dtype, H, D, 0, case.get("segments"))
    want = relative_reference(q0, dict(zip(needed, k0)), dict(zip(needed, v)), range(first, n), cfg, rotary, D**-0.5)
    return float((out.double() - want).abs().max())


def main():
    results = []
    for case in json.load(sys.stdin):
        try:
            results.append({"err": run_far_case(case) if "far" in case else run_case(case)})
        except Exception:
            results.append({"error": traceback.format_exc()})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
