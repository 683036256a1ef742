"""topk_blocks > 0: the real engine (paths/topk/) held to the dense top-k oracle.

docs/topk-contract.md, "Equivalences and oracles": engine logprobs equal
testing/topk_reference.dense_topk_attention within 1e-3 in prefill, chunked
prefill, decode and mixed batches, given the chunk boundaries the engine used;
every block the engine picked has a reference score (the default topk_score
"mass", or "bound") within a float tolerance of the k-th best; k = 0 is
today's engine bit for bit.

The chunk boundaries and the engine's picks are read from the engine itself:
`paths.topk.plan` is wrapped (the worker runs in this process, conftest sets
VLLM_ENABLE_V1_MULTIPROCESSING=0) to keep every step's Plan, whose `chunks`
give (request id, s, e) and whose `chosen` (filled by `run`) gives the blocks
each (layer, request) read. The tiny model's RoPE table is 128 positions;
prompts go to 1024 (8x) and decoding runs past the table.
"""

import functools
import gc
from dataclasses import dataclass, field

import pytest
import torch
from vllm import SamplingParams

from conftest import TABLE
from engine import engine, page_bytes, prompt_logprobs, random_prompt, sample_logprobs
from lminf_vllm.config import LminfConfig, LminfConfigError
from lminf_vllm.testing.reference import DenseLlama
from lminf_vllm.testing.topk_reference import (
    DEFAULT_SCORE,
    block_bounds,
    block_mass_shares,
    dense_topk_attention,
    kept_for,
    key_summaries,
    middle_blocks,
    query_at_cap,
    topk_selections,
)

ATOL = 1e-3  # the contract's tolerance on logprobs


def topk_options(G, W, C, k, score=None) -> dict:
    """additional_config for the engine; score None leaves topk_score out (the default, "mass")."""
    lminf = {"global_tokens": G, "local_tokens": W, "distance_cap": C, "topk_blocks": k}
    return {"lminf": lminf if score is None else {**lminf, "topk_score": score}}


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return DenseLlama(tiny_llama)


# ---------------------------------------------------------------- what the engine did


@dataclass
class Recorder:
    """Every Plan the top-k path made (dummy runs without request ids left out), and the
    order in which layers' caches were first seen (layer key -> layer index)."""

    plans: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)

    def log(self, request_id: str) -> list[tuple[int, int, dict[int, torch.Tensor]]]:
        """(s, e, {layer: [Hkv, k'] blocks read}) of each chunk the engine computed for this request
        (vLLM's LLM-level id), in order."""
        out = []
        for p in self.plans:
            for r, first, stop, seq_len, rid in p.chunks:
                if _external(rid) == request_id:
                    picked = {self.layers[key]: b.clone() for (key, rr), b in p.chosen.items() if rr == r}
                    out.append((seq_len - (stop - first), seq_len, picked))
        return out

    def spans(self, request_id: str) -> list[tuple[int, int]]:
        return [(s, e) for s, e, _ in self.log(request_id)]

    def chosen(self, request_id: str) -> dict[tuple[int, int, int], torch.Tensor]:
        """(s, e, layer) -> [Hkv, k'] blocks the engine read for that chunk (a request computed once)."""
        return {(s, e, layer): b for s, e, picked in self.log(request_id) for layer, b in picked.items()}

    def store(self):
        return self.plans[-1].store


def _external(rid: str | None) -> str | None:
    """vLLM 0.32 gives the engine core '<LLM request id>-<8 hex digits>'."""
    return None if rid is None else rid.rsplit("-", 1)[0]


@pytest.fixture
def recorder(monkeypatch):
    import lminf_vllm.paths.topk as topk

    rec = Recorder()
    plan, run = topk.plan, topk.run

    def recording_plan(batch, shape):
        p = plan(batch, shape)
        if any(c[4] is not None for c in p.chunks):
            rec.plans.append(p)
        return p

    def recording_run(p, layer, query, key, value, kv_cache, output):
        rec.layers.setdefault(topk._layer_key(layer, kv_cache), len(rec.layers))  # (vLLM's layer name)
        return run(p, layer, query, key, value, kv_cache, output)

    monkeypatch.setattr(topk, "plan", recording_plan)
    monkeypatch.setattr(topk, "run", recording_run)
    return rec


# ---------------------------------------------------------------- the oracle, given what the engine did


class Capture:
    """An `attention=` for DenseLlama: dense_topk_attention per layer, keeping each layer's q0, k0.
    selections (one per layer), when given, replace the reference's own choice."""

    def __init__(self, selections=None, **kw):
        self.kw, self.selections, self.layers = kw, selections, []

    def __call__(self, q, k, v, cfg, rotary, scale):
        layer = len(self.layers)
        self.layers.append((q, k, rotary, scale))
        kw = dict(self.kw)
        if self.selections is not None:
            kw["selection"] = self.selections[layer]
        return dense_topk_attention(q, k, v, cfg, rotary, scale, **kw)


@dataclass
class Checked:
    logp: torch.Tensor  # [n, vocab] the oracle's log-probabilities
    flips: int  # (chunk, layer, KV head) selections where the engine's differs from the oracle's
    worst_slack: float  # largest (k-th best score - chosen block's score) seen (the mass: as log shares)


def check_request(reference, tokens, cfg: LminfConfig, B: int, k: int, spans, chosen, rows, got,
                  score: str = DEFAULT_SCORE) -> Checked:  # fmt: skip
    """Hold one request to the oracle. spans: the engine's chunks of it (from 0, in order, no recompute);
    chosen: the engine's picks {(s, e, layer): [Hkv, k']}; rows: which reference rows `got` gives,
    as (row, token) pairs (log p(token | tokens[:row + 1])); score: the engine's topk_score."""
    assert spans and spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans
    chunks = [e - s for s, e in spans]
    if spans[-1][1] < len(tokens):  # rows the engine never computed (the last sampled token): one more chunk
        chunks.append(len(tokens) - spans[-1][1])
    capture = Capture(topk=k, block_size=B, chunks=chunks, score=score)
    logp = torch.log_softmax(reference.logits(tokens, cfg, attention=capture), dim=-1)
    row_idx = torch.tensor([r for r, _ in rows])
    tok_idx = torch.tensor([t for _, t in rows])
    expected = logp[row_idx, tok_idx]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m: f"n={len(tokens)}: {m}")

    # The engine's own selection: where it picked, what, and how good by the reference's score.
    flips, worst, engine_selections, differs = 0, float("-inf"), [], False
    for layer, (q0, k0, rotary, scale) in enumerate(capture.layers):
        Hkv, H = k0.shape[1], q0.shape[1]
        kmin, kmax = key_summaries(k0, B, rotary)
        ref_sel = {(s, e): heads for s, e, heads
                   in topk_selections(q0, k0, cfg, rotary, k, B, chunks, score=score, scale=scale)}  # fmt: skip
        layer_sel = []
        scored = None  # (row, picks) of the last chunk that scored: a decode row may keep its picks
        for s, e in spans:
            cand = middle_blocks(e - 1, cfg, B)
            picked = chosen.get((s, e, layer))
            if not cand:
                assert picked is None, (s, e, layer, picked)
                layer_sel.append((s, e, [[] for _ in range(Hkv)]))
                continue
            assert picked is not None, f"chunk {(s, e)} has middle blocks {cand} but layer {layer} picked none"
            assert picked.shape == (Hkv, min(k, len(cand))), (picked.shape, len(cand))
            if e - s == 1 and scored and kept_for(s, scored[0], scored[1].shape[1], min(k, len(cand)), cfg):
                assert torch.equal(picked, scored[1]), (s, e, layer, picked, scored)  # kept, not scored
                assert ref_sel[(s, e)] == ref_sel[scored[2]], (s, e, layer)  # the reference kept its own too
                layer_sel.append((s, e, picked.tolist()))
                continue
            if e - s == 1:  # (only a decode row's selection is kept)
                scored = (e - 1, picked, (s, e))
            q_cap = query_at_cap(q0[e - 1 : e], cfg, rotary)
            if score == "bound":
                per_head = block_bounds(q_cap, kmin, kmax)[0]  # [H, nb]
            else:  # log shares: the tolerance is relative to the share
                per_head = block_mass_shares(q_cap, k0, B, cand, rotary, scale, int8=score == "mass_int8")[0].log()
            best = per_head.view(Hkv, H // Hkv, -1).amax(dim=1)[:, cand.start : cand.stop]  # group max
            kth = best.topk(picked.shape[1], dim=-1).values[:, -1]
            for h in range(Hkv):
                blocks = picked[h].tolist()
                assert blocks == sorted(set(blocks)), blocks  # ascending, distinct
                assert all(b in cand for b in blocks), (blocks, cand)
                slack = kth[h] - best[h, torch.tensor(blocks) - cand.start]
                tol = 1e-3 * (1 + float(kth[h].abs()))
                assert float(slack.max()) <= tol, (s, e, layer, h, blocks, float(slack.max()))
                worst = max(worst, float(slack.max()))
                if blocks != ref_sel[(s, e)][h]:
                    flips += 1
            layer_sel.append((s, e, picked.tolist()))
            differs |= any(picked[h].tolist() != ref_sel[(s, e)][h] for h in range(Hkv))
        if len(chunks) > len(spans):
            layer_sel.append((spans[-1][1], len(tokens), [[] for _ in range(Hkv)]))
        engine_selections.append(layer_sel)
    if differs:  # a near-tie went the other way: given the engine's picks, the attention is still the oracle's
        given = Capture(engine_selections, topk=k, block_size=B, chunks=chunks, score=score)
        logp_given = torch.log_softmax(reference.logits(tokens, cfg, attention=given), dim=-1)
        torch.testing.assert_close(got, logp_given[row_idx, tok_idx], atol=ATOL, rtol=0)
    return Checked(logp, flips, worst)


def prompt_rows(prompt):
    return [(r, t) for r, t in enumerate(prompt[1:])]


# ---------------------------------------------------------------- prefill: one chunk, chunks, mixed batches

PREFILL_CASES = [
    # (G, W, C, B, k, max tokens per step, prompt lengths, chunks of a lone prompt or None, topk_score:
    # None leaves it to the default, "mass")
    pytest.param(4, 64, 96, 16, 2, 2048, (1024,), "one", None, id="G4-W64-C96-B16-k2-one-chunk-G-not-multiple"),
    pytest.param(4, 64, 96, 16, 2, 2048, (1024,), "one", "bound", id="G4-W64-C96-B16-k2-one-chunk-bound"),
    pytest.param(0, 64, 64, 32, 4, 96, (1024,), "budget", None, id="G0-W64-C64-B32-k4-chunks96-C-eq-W"),
    pytest.param(0, 64, 64, 32, 4, 96, (1024,), "budget", "bound", id="G0-W64-C64-B32-k4-chunks96-bound"),
    pytest.param(16, 48, 128, 16, 1, 80, (700,), "budget", "mass", id="G16-W48-C128-B16-k1-chunks80"),
    pytest.param(0, 64, 64, 32, 4, 96, (1024,), "budget", "mass_int8", id="G0-W64-C64-B32-k4-chunks96-mass-int8"),
    pytest.param(40, 96, 96, 32, 2, 128, (3, 77, 300, 640), None, None, id="G40-W96-C96-B32-k2-mixed-batch"),
]


@pytest.mark.parametrize("G, W, C, B, k, step, lengths, lone, score", PREFILL_CASES)
def test_prompt_logprobs_match_the_topk_oracle(tiny_llama, reference, recorder, G, W, C, B, k, step, lengths, lone,
                                               score):  # fmt: skip
    cfg = LminfConfig(G, W, C, k, score or DEFAULT_SCORE)
    prompts = [random_prompt(n, seed=n + G + k) for n in lengths]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    with engine(tiny_llama, lminf=topk_options(G, W, C, k, score), block_size=B, max_model_len=2048,
                max_num_batched_tokens=step, max_num_seqs=4, enable_chunked_prefill=True,
                enable_prefix_caching=True) as llm:  # fmt: skip
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is False  # turned off with k > 0
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    picked = 0
    for out, prompt in zip(outs, prompts):
        n = len(prompt)
        spans = recorder.spans(out.request_id)
        if lone == "one":
            assert spans == [(0, n)]
        elif lone == "budget":  # a lone prompt gets whole-budget chunks
            assert spans == [(s, min(n, s + step)) for s in range(0, n, step)]
        chosen = recorder.chosen(out.request_id)
        picked += len(chosen)
        got = prompt_logprobs(out, prompt)
        assert torch.isfinite(got).all()
        checked = check_request(reference, prompt, cfg, B, k, spans, chosen, prompt_rows(prompt), got, cfg.topk_score)
        if n == 300:  # top-k is not Λ here: the oracle is not met by accident
            lam = reference.prompt_logprobs(prompt, cfg)
            assert (lam - checked.logp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]).abs().max() > 0.1
    assert picked > 0  # middle blocks were read
    if lone is None:  # the mixed batch: the scheduler split the long prompt differently from a lone one
        long_spans = recorder.spans(outs[-1].request_id)
        assert len({e - s for s, e in long_spans}) > 1, long_spans


# ---------------------------------------------------------------- decode past the table


@pytest.mark.parametrize("score, refresh", [(None, None), ("bound", None), (None, 3), ("bound", 16)])
def test_greedy_decode_past_the_table_matches_the_topk_oracle(tiny_llama, reference, recorder, score, refresh):
    """Two prompts share the steps: one's prefill chunks interleave with the other's decode steps,
    each a chunk of one row; 100 greedy tokens, far past the 128-position table. The host store
    drops each request once it has ended. Both scores (None: the default, "mass"); topk_refresh
    None (the default, 1: every decode row scores), 3 and 16 (decode rows keep a selection)."""
    G, W, C, B, k = 10, 48, 80, 16, 3
    cfg = LminfConfig(G, W, C, k, score or DEFAULT_SCORE, **({} if refresh is None else {"topk_refresh": refresh}))
    prompts = [random_prompt(200, seed=21), random_prompt(40, seed=22)]
    params = SamplingParams(max_tokens=100, temperature=0.0, logprobs=0, ignore_eos=True)
    options = topk_options(G, W, C, k, score)
    if refresh is not None:
        options["lminf"]["topk_refresh"] = refresh
    with engine(tiny_llama, lminf=options, block_size=B, max_model_len=1024,
                max_num_batched_tokens=64, max_num_seqs=4) as llm:  # fmt: skip
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        # The host store forgets a request at the step after it ends (request ids are never reused,
        # so one dropped stays dropped); a second generate call leaves nothing of the first.
        store = recorder.store()
        dropped = frozenset().union(*(p.batch.finished for p in recorder.plans))
        assert dropped and not dropped & store.requests()
        later = llm.generate([{"prompt_token_ids": random_prompt(100, seed=5)}],
                             SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # fmt: skip
        left = {_external(r) for r in store.requests()}
        assert not left & {o.request_id for o in outs} and left <= {later[0].request_id}
    for out, prompt in zip(outs, prompts):
        completion = out.outputs[0]
        generated = list(completion.token_ids)
        tokens = prompt + generated
        assert len(generated) == 100 and len(tokens) - 1 > TABLE
        spans = recorder.spans(out.request_id)
        n = len(prompt)
        assert spans[-1] == (len(tokens) - 2, len(tokens) - 1)  # the last sampled token is never fed back
        assert all(e - s == 1 for s, e in spans if s >= n)  # decode steps: chunks of one row
        rows = [(n - 1 + i, t) for i, t in enumerate(generated)]
        checked = check_request(reference, tokens, cfg, B, k, spans, recorder.chosen(out.request_id), rows,
                                sample_logprobs(completion), cfg.topk_score)  # fmt: skip
        logp = checked.logp[n - 1 : -1]
        chosen = logp.gather(1, torch.tensor(generated)[:, None])[:, 0]
        assert (logp.max(dim=1).values - chosen).max() < ATOL  # every greedy pick is the oracle's best
    assert any(s >= 200 and e > 2 * TABLE for s, e in recorder.spans(outs[0].request_id))
    # the decode steps past the first middle block took attend_decode, the others attend_chunk
    served = [p.rows_served for p in recorder.plans]
    assert sum(r.get("topk decode", 0) for r in served) > 100 and sum(r.get("topk", 0) for r in served) > 200


@pytest.mark.parametrize("score", [None, "bound", "mass_int8"])
def test_bfloat16_decode_reads_windows_and_store_keys_through_vllms_op(tiny_llama, reference, recorder, monkeypatch,
                                                                       score):  # fmt: skip
    """A bfloat16 engine (most models' dtype, so vLLM's default) with C = W attends its decode rows
    by far_kernel's C++ pass (the default): the windows in place in the pool and every other key
    from the store, in one softmax; with that pass switched off, the windows through vLLM's decode
    op (paths/topk/ops.py) joined with the other keys in PyTorch; with the op switched off, the
    same engine takes the PyTorch math. Each of 12 requests decodes one row past its first middle block (its second
    token: the first comes from the prompt's chunk, the same every way). The op's two ways agree to
    bfloat16 noise (the engine's logits are bfloat16: a few 0.01s), and neither is farther from
    the float64 oracle (the model's weights rounded to bfloat16 as the engine holds them) than
    the PyTorch way. Each score (None: the default, "mass")."""
    from lminf_vllm.paths.topk import far_kernel, ops

    G, W, C, B, k = 4, 64, 64, 32, 2
    cfg = LminfConfig(G, W, C, k, score or DEFAULT_SCORE)
    prompts = [random_prompt(150 + 23 * j, seed=60 + j) for j in range(12)]
    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=5)
    runs = []
    with engine(tiny_llama, lminf=topk_options(G, W, C, k, score), block_size=B, dtype="bfloat16",
                max_model_len=1024) as llm:  # fmt: skip
        for op_switch, far_switch in (("1", "0"), ("1", "1"), ("0", "1")):
            monkeypatch.setenv(ops.ENV_SWITCH, op_switch)
            monkeypatch.setenv(far_kernel.ENV_SWITCH, far_switch)
            first = len(recorder.plans)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            rows: dict[str, int] = {}
            for p in recorder.plans[first:]:
                for way, n in p.rows_served.items():
                    rows[way] = rows.get(way, 0) + n
            steps = [st for p in recorder.plans[first:] for st in p.steps.values()]
            by_far = sum(len(st.rows) for st in steps if st.far_counts is not None)
            runs.append(([o.outputs[0] for o in outs], rows, by_far))
    (op, op_rows, op_far), (far, far_rows, far_far), (pt, pt_rows, pt_far) = runs
    for fast_rows in (far_rows, op_rows):
        assert fast_rows.get("topk decode op", 0) == 12 and "topk decode" not in fast_rows, fast_rows
    assert (far_far, op_far, pt_far) == (12, 0, 0)  # the rows far_kernel read
    assert pt_rows.get("topk decode", 0) == 12 and "topk decode op" not in pt_rows, pt_rows
    ref = DenseLlama(tiny_llama)
    ref.w = {name: w.to(torch.bfloat16).double() for name, w in ref.w.items()}
    err = {"far": [], "op": [], "pt": []}
    for prompt, *ways in zip(prompts, far, op, pt):
        assert len({w.token_ids[0] for w in ways}) == 1  # the prompt's chunk: the same way every time
        tokens = prompt + [ways[0].token_ids[0]]
        oracle = functools.partial(dense_topk_attention, topk=k, block_size=B, chunks=[len(prompt), 1],
                                   score=cfg.topk_score)  # fmt: skip
        logp = torch.log_softmax(ref.logits(tokens, cfg, attention=oracle)[-1], -1)
        got = {name: {t: e.logprob for t, e in w.logprobs[1].items()} for name, w in zip(err, ways)}
        for t in got["far"].keys() & got["op"].keys() & got["pt"].keys():
            assert abs(got["op"][t] - got["far"][t]) < 0.15, (t, got["op"][t], got["far"][t])  # bf16 logits: ~0.03 steps
            for name in err:
                err[name].append(abs(got[name][t] - float(logp[t])))
    assert len(err["pt"]) >= 36
    # the op's two ways join their parts in float32 where PyTorch's rounds to bfloat16 first, so a
    # near tie of the bound in a later layer may go the other way (seen once in 12 requests: 0.38 off
    # the PyTorch way's logprob); held to the oracle instead: seen 5.15 / 5.77 / 5.95 summed (bound)
    assert max(err["far"]) <= max(err["pt"]) + 0.05 and max(err["op"]) <= max(err["pt"]) + 0.05
    assert sum(err["far"]) <= sum(err["pt"]) * 1.1 and sum(err["op"]) <= sum(err["pt"]) * 1.1


# ---------------------------------------------------------------- preemption


def test_preempted_requests_computed_again_still_match_the_oracle(tiny_llama, reference, recorder):
    """A pool of 12 blocks for 4 requests of ~200 tokens: some are preempted and computed again
    from position 0 (the host store overwrites their blocks). Each computation of a request is
    held to the oracle with its own chunks, for the tokens it sampled."""
    G, W, C, B, k = 4, 64, 96, 32, 2
    cfg = LminfConfig(G, W, C, k)
    prompts = [random_prompt(n, seed=n) for n in (200, 210, 220, 230)]
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=0, ignore_eos=True)
    pool = 12 * page_bytes()
    with engine(tiny_llama, lminf=topk_options(G, W, C, k), block_size=B, max_model_len=1024,
                max_num_batched_tokens=128, max_num_seqs=4, kv_cache_memory_bytes=pool) as llm:  # fmt: skip
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        preempt, preempted = scheduler._preempt_request, []
        scheduler._preempt_request = lambda r, *a, **kw: (preempted.append(r.request_id), preempt(r, *a, **kw))[1]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert preempted, "the pool was meant to force preemption"
    recomputed = 0
    for out, prompt in zip(outs, prompts):
        completion = out.outputs[0]
        tokens = prompt + list(completion.token_ids)
        runs = []  # the request's computations: a chunk that does not follow the last one starts again at 0
        for s, e, picked in recorder.log(out.request_id):
            if not runs or s != runs[-1][-1][1]:
                assert s == 0, (s, runs and runs[-1][-1])
                runs.append([])
            runs[-1].append((s, e, picked))
        recomputed += len(runs) - 1
        got, sampled_by = sample_logprobs(completion), {}
        for j, run in enumerate(runs):  # the token of row r comes from the first computation ending a chunk at r + 1
            for _, e, _ in run:
                if e >= len(prompt):
                    sampled_by.setdefault(e - 1, j)
        rows = range(len(prompt) - 1, len(tokens) - 1)
        assert set(rows) <= set(sampled_by)
        for j, run in enumerate(runs):
            mine = [r for r in rows if sampled_by[r] == j]
            if not mine:
                continue
            end = run[-1][1]
            chosen = {(s, e, layer): b for s, e, picked in run for layer, b in picked.items()}
            idx = torch.tensor([r - (len(prompt) - 1) for r in mine])
            check_request(reference, tokens[:end], cfg, B, k, [(s, e) for s, e, _ in run], chosen,
                          [(r, tokens[r + 1]) for r in mine], got[idx])  # fmt: skip
    assert recomputed > 0


# ---------------------------------------------------------------- k = 0 is today's engine


def test_k0_is_exactly_the_engine_without_the_key(tiny_llama, recorder):
    G, W, C = 4, 64, 96
    prompts = [random_prompt(n, seed=n) for n in (77, 300)]
    params = SamplingParams(max_tokens=5, temperature=0.0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
    results = []
    for lminf in ({"lminf": {"global_tokens": G, "local_tokens": W, "distance_cap": C}}, topk_options(G, W, C, 0)):
        with engine(tiny_llama, lminf=lminf, max_model_len=1024, max_num_batched_tokens=96) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results.append([(prompt_logprobs(o, p), list(o.outputs[0].token_ids), sample_logprobs(o.outputs[0]))
                        for o, p in zip(outs, prompts)])  # fmt: skip
    for (lp0, ids0, s0), (lp1, ids1, s1) in zip(*results):
        assert torch.equal(lp0, lp1) and ids0 == ids1 and torch.equal(s0, s1)
    assert recorder.plans == [] and recorder.layers == {}  # the top-k path was never taken


# ---------------------------------------------------------------- the host store


def test_the_store_keeps_at_most_the_last_step_and_goes_with_the_engine(tiny_llama, recorder):
    """vLLM reports finished requests with the next step, so after generate returns the store
    may still hold the requests of the engine's last step, and nothing older; the store itself
    is dropped with the engine."""
    import lminf_vllm.paths.topk as topk

    G, W, C, B, k = 4, 32, 48, 16, 2
    with engine(tiny_llama, lminf=topk_options(G, W, C, k), block_size=B, max_model_len=1024,
                max_num_batched_tokens=64, max_num_seqs=4) as llm:  # fmt: skip
        for n in (150, 90):  # two calls: the first one's request is reported finished during the second
            llm.generate([{"prompt_token_ids": random_prompt(n, seed=n)}],
                         SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), use_tqdm=False)  # fmt: skip
        last_step = {c[4] for c in recorder.plans[-1].chunks}
        assert recorder.store().requests() <= last_step and len(last_step) == 1
        key = id(recorder.plans[-1].shape)
        assert key in topk._STORES
    recorder.plans.clear()
    gc.collect()
    assert key not in topk._STORES


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("value, message", [
    (-1, r"additional_config\.lminf\.topk_blocks = -1 is invalid: it must be >= 0"),
    ("2", r"additional_config\.lminf\.topk_blocks = '2' is invalid: it must be an integer"),
])  # fmt: skip
def test_bad_topk_blocks_is_refused_at_start(tiny_llama, value, message):
    with pytest.raises(ValueError, match=message) as raised:
        with engine(tiny_llama, lminf=topk_options(4, 32, 64, value), max_model_len=256):
            pass
    error = raised.value
    if not isinstance(error, LminfConfigError):  # vLLM's config is a pydantic dataclass: it wraps the error
        error = error.errors()[0]["ctx"]["error"]
    assert isinstance(error, LminfConfigError)
