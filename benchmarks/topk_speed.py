r"""Decode and prefill speed of top-k middle blocks against Λ alone, in the same engine settings.

Both engines are vllm.LLM in this process with the issue's settings for
SmolLM2-135M-Instruct (the passkey must-show's): G = 10, W = C = 2,048,
blocks of 64, vLLM's defaults otherwise (the model's dtype, bfloat16;
torch.compile; a step budget of 2,048 tokens). "lambda" is topk_blocks = 0
(the CPU-kernel path); "topk" adds topk_blocks = k (the top-k path, whose
decode includes storing completed blocks, scoring every middle block's
summary, choosing k per layer and KV head, and gathering them from the host
store). Text is the pinned held-out corpus, tokenized by the model.

Decode: ms per step over --gen steps after an n-token prompt (the engine's own
per-request timestamps: (last token - first token) / gen). Prefill: tokens
per second of that prompt (first token - scheduled). A short warm-up prompt
is not timed; of --repeats runs per engine and --rounds engines per mode
(started in alternation, so that the machine's drift falls on both modes)
the fastest counts, and every round's decode time is kept.

    python benchmarks/topk_speed.py                            # 32k prompt, ~10 min on 2 cores
    python benchmarks/topk_speed.py --lengths 4096 32768 --gen 32
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from corpus import corpus_info  # noqa: E402
from kv_memory import in_process_engine_env  # noqa: E402
from serve_speed import model_and_tokens, prompt  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' or an HF directory")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768], help="prompt tokens before decoding")
    p.add_argument("--gen", type=int, default=32, help="decode steps timed")
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--local-tokens", type=int, default=2048)
    p.add_argument("--distance-cap", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--topk-blocks", type=int, default=4)
    p.add_argument("--topk-score", choices=("mass", "bound", "mass_int8"), help="topk_score of the topk mode (default: the engine's)")
    p.add_argument("--step-tokens", type=int, default=2048, help="max_num_batched_tokens (vllm serve's on CPU)")
    p.add_argument("--kv-gib", type=float, default=2)
    p.add_argument("--modes", nargs="+", default=["lambda", "topk"], choices=("lambda", "topk"))
    p.add_argument("--repeats", type=int, default=1, help="runs per engine; the fastest counts")
    p.add_argument("--rounds", type=int, default=2,
                   help="engines per mode, in alternation (lambda, topk, lambda, ...): the machine's drift "
                        "falls on both modes; the fastest counts")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/topk-speed.json"))
    return p.parse_args(argv)


def run_mode(args, model, mode, tokens) -> dict:
    from vllm import LLM, SamplingParams

    lminf = {"global_tokens": args.global_tokens, "local_tokens": args.local_tokens, "distance_cap": args.distance_cap}
    if mode == "topk":
        lminf["topk_blocks"] = args.topk_blocks
        if args.topk_score is not None:
            lminf["topk_score"] = args.topk_score
    llm = LLM(
        model=str(model), attention_backend="lminf", max_model_len=max(args.lengths) + args.gen + 8, seed=0,
        block_size=args.block_size, max_num_batched_tokens=args.step_tokens, enable_prefix_caching=False,
        disable_log_stats=False, kv_cache_memory_bytes=int(args.kv_gib * 2**30), additional_config={"lminf": lminf},
    )  # fmt: skip
    gen = SamplingParams(max_tokens=args.gen + 1, temperature=0.0, ignore_eos=True)
    llm.generate([prompt(tokens, 256)], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
    rows = []
    for n in args.lengths:
        best = None
        for _ in range(args.repeats):
            m = llm.generate([prompt(tokens, n)], gen, use_tqdm=False)[0].metrics
            run = {"prefill_s": m.first_token_ts - m.scheduled_ts, "decode_s": (m.last_token_ts - m.first_token_ts) / args.gen}
            best = run if best is None else {k: min(best[k], run[k]) for k in run}
        rows.append({"mode": mode, "prompt_tokens": n, "prefill_tok_s": round(n / best["prefill_s"], 1),
                     "decode_ms": round(1000 * best["decode_s"], 2)})  # fmt: skip
        print(rows[-1], flush=True)
    cfg = llm.llm_engine.vllm_config
    for r in rows:
        r.update(dtype=str(cfg.model_config.dtype).removeprefix("torch."), block_size=cfg.cache_config.block_size,
                 compiled=not cfg.model_config.enforce_eager, lminf=cfg.additional_config.get("lminf_resolved"))  # fmt: skip
    llm.llm_engine.engine_core.shutdown()
    del llm
    return rows


def main(argv=None):
    in_process_engine_env()
    args = parse_args(argv)
    model, tokens = model_and_tokens(args.model)
    started = time.time()
    runs = [r for _ in range(args.rounds) for mode in args.modes for r in run_mode(args, model, mode, tokens)]
    rows = []
    for mode in args.modes:
        for n in args.lengths:
            mine = [r for r in runs if r["mode"] == mode and r["prompt_tokens"] == n]
            best = min(mine, key=lambda r: r["decode_ms"])
            rows.append({**best, "prefill_tok_s": max(r["prefill_tok_s"] for r in mine),
                         "decode_ms_each_round": [r["decode_ms"] for r in mine]})  # fmt: skip
    ratios = {}
    for n in args.lengths:
        by = {r["mode"]: r for r in rows if r["prompt_tokens"] == n}
        if {"lambda", "topk"} <= set(by):
            ratios[str(n)] = {
                "decode_topk_x_lambda": round(by["topk"]["decode_ms"] / by["lambda"]["decode_ms"], 3),
                "prefill_topk_x_lambda": round(by["topk"]["prefill_tok_s"] / by["lambda"]["prefill_tok_s"], 3),
            }
    doc = {"args": {k: str(v) for k, v in vars(args).items()}, "corpus": corpus_info(),
           "command": "python benchmarks/topk_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seconds": round(time.time() - started), "rows": rows, "ratios": ratios}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**doc, "cpu": describe()}, indent=2) + "\n")
    print("| mode | prompt tokens | prefill tok/s | decode ms/step |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['prompt_tokens']} | {r['prefill_tok_s']} | {r['decode_ms']} |")
    print(json.dumps(ratios, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
