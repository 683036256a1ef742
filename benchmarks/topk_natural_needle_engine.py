r"""A secret number hidden in natural text, found through the engine itself (issue 33).

The task of benchmarks/topk_natural_needle.py (its prompt builder: the pinned CPython
modules of benchmarks/corpus.py, `The secret number is NNNNN. Remember it.` at 10%,
40% and 70% of each, ~4k-token chat prompts, the question at the end, the assistant's
turn opened with `The secret number is`), but every variant is a real engine,
vllm.LLM in this process: stock vLLM (attention_backend CPU_ATTN), Λ alone
(attention_backend "lminf", topk_blocks = 0), and top-k with either selection score
(topk_score "bound", Quest's, or "mass", the block's attention mass) and several k.
Same engine settings for all: the model's bfloat16, blocks of --block-size (128:
vLLM's CPU default, which `make serve` keeps), enforce_eager, steps of --step-tokens,
one request at a time, greedy, --max-new tokens; a hit is an answer that contains the
number. The TRIED variants swap the engine's selection for a rule tried and not kept (a
cheaper score: Quest's bound as a first pass, keys rounded to 8 or 4 bits, one query per KV
head; or another ranking: each token scored at its own distance, a KV head's picks taken from
its query heads in turn), in-process, or for a diagnostic (the needle's blocks forced into
every selection). "every middle block" (k = 32) is the contract with nothing selected away.

Per top-k trial the script also reads which blocks the engine chose (paths.topk's
Plan.chosen, in-process) and records the share of (step, layer, KV head) selections
of that request that hold a block of the needle sentence.

    python benchmarks/topk_natural_needle_engine.py               # ~30 min on 2 shared cores
    python benchmarks/topk_natural_needle_engine.py --variants 'topk mass k=4' --trial-index 0 1
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import corpus_info, pinned_documents  # noqa: E402
from kv_memory import in_process_engine_env  # noqa: E402
from topk_natural_needle import ANSWER_START, NEEDLE, QUESTION, build_trials  # noqa: E402

from lminf_vllm.cpu_isa import describe  # noqa: E402

# name -> (attention backend, topk_blocks, topk_score, topk_refresh: None leaves the default)
VARIANTS = {
    "full attention (stock CPU_ATTN)": ("CPU_ATTN", 0, None, None),
    "lambda (k=0)": ("lminf", 0, None, None),
    "topk bound k=4": ("lminf", 4, "bound", None),
    "topk mass k=4": ("lminf", 4, "mass", None),
    "topk mass k=6": ("lminf", 6, "mass", None),
    "topk mass k=8": ("lminf", 8, "mass", None),
    "topk mass k=12": ("lminf", 12, "mass", None),
    "topk mass_int8 k=4": ("lminf", 4, "mass_int8", None),  # the engine's 8-bit copy (topk_score "mass_int8")
    "topk mass_int8 k=8": ("lminf", 8, "mass_int8", None),
    "topk every middle block (k=32)": ("lminf", 32, "mass", None),
    "topk mass k=4 refresh=16": ("lminf", 4, "mass", 16),
    "topk mass k=12 refresh=16": ("lminf", 12, "mass", 16),
}
# variants whose selection rule is one tried and not in the engine (TriedRule, below), each in an
# engine of the mass score: name -> (topk_blocks, the rule)
TRIED = {"topk mass k=4 bound-prefilter=2": (4, lambda args, model: BoundPrefilter(2)),
         "topk mass k=4 bound-prefilter=4": (4, lambda args, model: BoundPrefilter(4)),
         "topk mass k=4 int8 keys": (4, lambda args, model: SketchedMass(8)),
         "topk mass k=4 int4 keys": (4, lambda args, model: SketchedMass(4)),
         "topk mass k=4 int8 keys and query": (4, lambda args, model: SketchedMass(8, 8)),
         "topk mass k=4 int4 keys, int8 query": (4, lambda args, model: SketchedMass(4, 8)),
         "topk mass k=4 one query per KV head": (4, lambda args, model: GroupQueryMass()),
         "topk mass k=4 true distance": (4, lambda args, model: TrueDistanceMass(model_rotary(model), args.distance_cap)),
         "topk mass k=12 true distance": (12, lambda args, model: TrueDistanceMass(model_rotary(model), args.distance_cap)),
         "topk mass k=4 needle forced": (4, lambda args, model: NeedleForced()),
         "topk mass k=4 heads in turn": (4, lambda args, model: HeadsInTurn()),
         "topk mass k=4 heads in turn, true distance":
             (4, lambda args, model: HeadsInTurnTrueDistance(model_rotary(model), args.distance_cap))}
VARIANTS.update({name: ("lminf", k, "mass", None) for name, (k, _) in TRIED.items()})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all but the tried rules (TRIED) and k=32")
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (about)")
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.4, 0.7])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trial-index", type=int, nargs="+", help="run only these trials (0-based, documents x depths)")
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--local-tokens", type=int, default=1024)
    p.add_argument("--distance-cap", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--step-tokens", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--max-new", type=int, default=8)
    p.add_argument("--kv-gib", type=float, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/topk-natural-needle-engine.json"))
    return p.parse_args(argv)


class Chosen:
    """Wraps paths.topk.plan to keep each step's Plan (in-process engine): which blocks each
    (layer, request) chose."""

    def __init__(self):
        import lminf_vllm.paths.topk as topk

        self.plans, self._topk, self._plan = [], topk, topk.plan

        def recording(batch, shape):
            p = self._plan(batch, shape)
            if any(c[4] is not None for c in p.chunks):
                self.plans.append(p)
            return p

        topk.plan = recording

    def needle_share(self, blocks: set[int]) -> tuple[float | None, int]:
        """Share of the recorded (step, layer, KV head) selections holding a needle block; the count."""
        hit = total = 0
        for p in self.plans:
            for chosen in p.chosen.values():
                for row in chosen.tolist():
                    total += 1
                    hit += bool(blocks & set(row))
        self.plans = []
        return (round(hit / total, 3) if total else None), total

    def close(self):
        self._topk.plan = self._plan


class TriedRule:
    """Selection rules tried on this task and not kept (docs/topk-contract.md, "Cheaper scores, tried
    through the engine"): variations of the mass score, cheaper to compute or exact where it
    approximates. Patches the in-process engine's two selection calls (a chunk's, the decode rows')
    with `scores`, then ranks as the engine does (k best per KV head, the lower block on ties)."""

    def __init__(self):
        import lminf_vllm.paths.topk as topk
        from lminf_vllm.paths.topk import attention as att

        self._topk, self._att, self._saved = topk, att, (topk.select_stored, att.select_stored_rows)

        def select_stored(store, request, layer, q_cap, first, stop, cfg, scale):
            if stop - first <= cfg.topk_blocks:
                return self._saved[0](store, request, layer, q_cap, first, stop, cfg, scale)
            self.row = 0
            s = self.scores(store, request, layer, q_cap, first, stop, scale)
            return att._top_k_rows(s[None], [stop - first], first, cfg.topk_blocks)[0]

        def select_stored_rows(store, rows, layer, q_caps, first, cfg, scale):
            per_row = []
            for r, (request, stop) in enumerate(rows):
                self.row = r  # (the step's decode row being scored)
                per_row.append(self.scores(store, request, layer, q_caps[r], first, stop, scale))
            counts = [s.shape[1] for s in per_row]
            score = torch.full((len(rows), per_row[0].shape[0], max(counts)), float("-inf"))
            for r, s in enumerate(per_row):
                score[r, :, : counts[r]] = s
            return att._top_k_rows(score, counts, first, cfg.topk_blocks)

        topk.select_stored, att.select_stored_rows = select_stored, select_stored_rows

    def scores(self, store, request, layer, q_cap, first, stop, scale) -> torch.Tensor:
        """[Hkv, stop - first]: each candidate block's score, per KV head (-inf: never picked)."""
        raise NotImplementedError

    def close(self):
        self._topk.select_stored, self._att.select_stored_rows = self._saved


class BoundPrefilter(TriedRule):
    """Quest's bound as a cheap first pass for the mass: per row and layer, each KV head's n best
    candidates by the bound; the mass scores (shares over) their union over the KV heads only.
    It would read n x Hkv blocks' keys a row instead of every middle block's."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def scores(self, store, request, layer, q_cap, first, stop, scale):
        bound = self._att.bound_scores(q_cap, store.bounds(request, layer, first, stop))
        kept = torch.topk(bound, min(self.n, stop - first), dim=-1).indices.flatten().unique()
        keys = torch.cat(store.keys_at_zero(request, layer, first, stop))[kept]
        full = torch.full(bound.shape, float("-inf"))
        full[:, kept] = self._att.mass_scores(q_cap, [keys], scale)
        return full


class SketchedMass(TriedRule):
    """The mass from keys rounded to `bits`-bit integers (symmetric, one scale per key and KV head:
    what a key sketch for scoring would store, 1/2 or 1/4 of bfloat16's bytes); with query_bits,
    the query rotated to C rounded too (one scale per query head: what integer dot products
    need). The attention still reads the exact keys."""

    def __init__(self, bits: int, query_bits: int | None = None):
        super().__init__()
        self.bits, self.query_bits = bits, query_bits

    def scores(self, store, request, layer, q_cap, first, stop, scale):
        keys = torch.cat(store.keys_at_zero(request, layer, first, stop)).float()  # [n, Hkv, B, D]
        q = q_cap if self.query_bits is None else rounded(q_cap, self.query_bits)
        return self._att.mass_scores(q, [rounded(keys, self.bits)], scale)


class GroupQueryMass(TriedRule):
    """The mass scored with one query per KV head, the mean of its query heads' (rotated to C):
    a third of the scores and exponentials for SmolLM2's 3 query heads a KV head. The attention
    still reads with every head's own query."""

    def scores(self, store, request, layer, q_cap, first, stop, scale):
        keys = store.keys_at_zero(request, layer, first, stop)
        return self._att.mass_scores(q_cap.view(keys[0].shape[1], -1, q_cap.shape[-1]).mean(1), keys, scale)


class TrueDistanceMass(TriedRule):
    """The mass with each candidate token scored at the distance the attention reads it at,
    min(i - j, C), where the engine's rule scores every one at C (they differ for W <= i - j < C,
    where C > W). Needs each scoring row's position i: read from paths.topk's calls (a chunk's
    first_window_block(e - 1) just before its selection; the decode rows' list)."""

    def __init__(self, rotary, cap: int):
        super().__init__()
        import lminf_vllm.paths.topk as topk

        self.rotary, self.cap, self.rows_i = rotary, cap, [0]
        self._fwb, self._sdr = topk.first_window_block, topk.select_decode_rows

        def first_window_block(i, W, B):
            self.rows_i = [i]
            return self._fwb(i, W, B)

        def select_decode_rows(store, rows, layer, q_caps, first, cfg, scale):
            self.rows_i = [i for _, _, i in rows]
            return self._sdr(store, rows, layer, q_caps, first, cfg, scale)

        topk.first_window_block, topk.select_decode_rows = first_window_block, select_decode_rows

    def scores(self, store, request, layer, q_cap, first, stop, scale):
        from lminf_vllm.rope import cos_sin, rotate

        i = self.rows_i[self.row]
        keys = torch.cat(store.keys_at_zero(request, layer, first, stop)).float()  # [n, Hkv, B, D] at position 0
        n, Hkv, B, D = keys.shape
        j = first * B + torch.arange(n * B)
        # <R(d) q0, u> = <R(C) q0, R(C - d) u>: q_cap is the query at C, so each key turns by C - d >= 0
        cos, sin = cos_sin(self.cap - torch.clamp(i - j, max=self.cap), self.rotary.inv_freq, torch.float32)
        turned = rotate(keys.transpose(1, 2).reshape(n * B, Hkv, D), cos[:, None], sin[:, None], self.rotary)
        return self.rank(q_cap, [turned.view(n, B, Hkv, D).transpose(1, 2).contiguous()], scale)

    def rank(self, q_cap, pieces, scale) -> torch.Tensor:
        return self._att.mass_scores(q_cap, pieces, scale)

    def close(self):
        super().close()
        self._topk.first_window_block, self._topk.select_decode_rows = self._fwb, self._sdr


class HeadsInTurn(TriedRule):
    """The mass ranked per query head, and a KV head's k picks taken from its query heads in turn
    (each one's best, then each one's second, ...) instead of by the group's max share: with k a
    multiple of the group, every query head gets its own k / group best blocks."""

    def scores(self, store, request, layer, q_cap, first, stop, scale):
        return heads_in_turn(q_cap, store.keys_at_zero(request, layer, first, stop), scale)


def heads_in_turn(q_cap, pieces, scale) -> torch.Tensor:
    """HeadsInTurn's score: [Hkv, n], higher first; the k best are each query head's best in turn."""
    from lminf_vllm.paths.topk import attention as att

    lse = att._block_lse_eager(q_cap.float(), pieces, scale)
    share = lse - torch.logsumexp(lse, dim=-1, keepdim=True)  # [Hkv, g, n]
    rank = share.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0: a query head's best block
    best_rank = rank.amin(dim=1).float()  # [Hkv, n]
    return -best_rank + share.amax(dim=1).exp() * 0.5  # (a share < 1 breaks ties between equal ranks)


class HeadsInTurnTrueDistance(TrueDistanceMass):
    """HeadsInTurn with each candidate token scored at its own distance (TrueDistanceMass)."""

    def rank(self, q_cap, pieces, scale):
        return heads_in_turn(q_cap, pieces, scale)


class NeedleForced(TriedRule):
    """A diagnostic, not a rule: the exact mass, with the trial's needle blocks (set per trial by
    run_variant) ranked first in every selection that can hold them. What the engine reads when the
    selection never misses the needle: tells a selection miss from a reading miss."""

    needle_blocks: set[int] = set()

    def scores(self, store, request, layer, q_cap, first, stop, scale):
        s = self._att.mass_scores(q_cap, store.keys_at_zero(request, layer, first, stop), scale)
        for b in self.needle_blocks:
            if first <= b < stop:
                s[:, b - first] = float("inf")
        return s


def model_rotary(model_dir) -> "RotarySpec":
    """The model's RoPE (a Llama: halves rotated, default inverse frequencies), from its config.json."""
    from lminf_vllm.rope import RotarySpec, default_inv_freq

    config = json.loads((Path(model_dir) / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta", 10000.0)
    D = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return RotarySpec(default_inv_freq(theta, D), D, True)


def rounded(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to bits-bit integers times one scale per vector of its last dimension (symmetric)."""
    step = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / (2 ** (bits - 1) - 1)
    return torch.round(x / step) * step


def run_variant(args, model_dir, name, trials) -> dict:
    from vllm import LLM, SamplingParams

    backend, k, score, refresh = VARIANTS[name]
    options = dict(model=str(model_dir), dtype=args.dtype, enforce_eager=True, block_size=args.block_size, seed=0,
                   max_model_len=args.length + 256, kv_cache_memory_bytes=int(args.kv_gib * 2**30),
                   enable_prefix_caching=False, max_num_batched_tokens=args.step_tokens, max_num_seqs=1,
                   attention_backend=backend)  # fmt: skip
    if backend == "lminf":
        lminf = {"global_tokens": args.global_tokens, "local_tokens": args.local_tokens,
                 "distance_cap": args.distance_cap, "topk_blocks": k}  # fmt: skip
        if score is not None:
            lminf["topk_score"] = score
        if refresh is not None:
            lminf["topk_refresh"] = refresh
        options["additional_config"] = {"lminf": lminf}
    t0 = time.time()
    llm = LLM(**options)
    start_s = time.time() - t0
    rec = Chosen() if k else None
    tried = TRIED[name][1](args, model_dir) if name in TRIED else None
    params = SamplingParams(max_tokens=args.max_new, temperature=0.0)
    rows = []
    try:
        for trial in trials:
            if isinstance(tried, NeedleForced):
                tried.needle_blocks = {x // args.block_size for x in range(*trial["needle_tokens"])}
            t1 = time.time()
            out = llm.generate([{"prompt_token_ids": trial["ids"]}], params, use_tqdm=False)[0]
            seconds = time.time() - t1
            text = out.outputs[0].text
            a, b = trial["needle_tokens"]
            row = {"document": trial["document"], "depth": trial["depth"], "key": trial["key"],
                   "prompt_tokens": len(trial["ids"]), "needle_tokens": [a, b], "needle_from_end": len(trial["ids"]) - a,
                   "answer": text, "hit": str(trial["key"]) in text, "seconds": round(seconds, 1)}  # fmt: skip
            if rec is not None:
                share, n = rec.needle_share({x // args.block_size for x in range(a, b)})
                row.update(needle_selected_share=share, selections=n)
            rows.append(row)
            print(f"  {name}: {trial['document']} {trial['depth']} key {trial['key']}: {text!r} "
                  f"{'HIT' if row['hit'] else 'miss'}" + (f" sel {row['needle_selected_share']}" if rec else "")
                  + f" {seconds:.1f} s", flush=True)  # fmt: skip
    finally:
        if rec is not None:
            rec.close()
        if tried is not None:
            tried.close()
    cfg = llm.llm_engine.vllm_config
    resolved = {"dtype": str(cfg.model_config.dtype).removeprefix("torch."), "block_size": cfg.cache_config.block_size,
                "enforce_eager": cfg.model_config.enforce_eager, "attention_backend": backend,
                "lminf": cfg.additional_config.get("lminf_resolved") if backend == "lminf" else None}  # fmt: skip
    llm.llm_engine.engine_core.shutdown()
    del llm
    return {"backend": backend, "topk_blocks": k, "topk_score": score, "topk_refresh": refresh,
            "tried_rule": type(tried).__name__ if tried else None, "engine": resolved,
            "engine_start_s": round(start_s, 1), "seconds": round(time.time() - t0, 1),
            "found": sum(r["hit"] for r in rows), "of": len(rows), "trials": rows}  # fmt: skip


def main(argv=None):
    in_process_engine_env()
    args = parse_args(argv)
    # (the engine's own rules, without the 5-minute "every middle block")
    args.variants = args.variants or [v for v in VARIANTS if v not in TRIED and "every middle block" not in v]
    from transformers import AutoTokenizer

    from lminf_vllm.prepare_model import DEFAULT_OUT

    model_dir = DEFAULT_OUT
    tok = AutoTokenizer.from_pretrained(model_dir)
    trials = build_trials(tok, pinned_documents()[: args.documents], args.length, args.depths, args.seed)
    if args.trial_index:
        trials = [trials[i] for i in args.trial_index]
    started = time.time()
    doc = {"task": "natural-text needle: " + NEEDLE.strip() + " inside the pinned CPython modules; question: " + QUESTION
                   + f"; chat template, the answer starts {ANSWER_START!r}; hit = the greedy answer contains the number",
           "model": model_dir.name, "corpus": corpus_info(),
           "command": "python benchmarks/topk_natural_needle_engine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "args": {k: str(v) for k, v in vars(args).items()}, "variants": {}}  # fmt: skip
    for name in args.variants:
        print(f"{name}: starting an engine", flush=True)
        doc["variants"][name] = run_variant(args, model_dir, name, trials)
        doc["seconds"] = round(time.time() - started)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**doc, "cpu": describe()}, indent=1) + "\n")  # after each variant
    print("\n| variant | found / trials | engine start s | all s |\n|---|---|---|---|")
    for name, v in doc["variants"].items():
        print(f"| {name} | {v['found']} / {v['of']} | {v['engine_start_s']} | {v['seconds']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
