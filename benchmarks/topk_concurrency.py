r"""Decode speed of top-k middle blocks against Λ alone with many requests at once.

Issue 33's must-show: decode tokens/s at 16k prompts with 1, 8 and 32 concurrent
requests, top-k >= 0.67x Λ at every concurrency. Both modes are vllm.LLM in this
process with make serve's engine on CPU for SmolLM2-135M-Instruct (bfloat16, blocks
of 128, torch.compile, a step budget of 2,048 tokens) and the passkey must-show's
G = 10, W = C = 2,048; "topk" adds topk_blocks = k (and topk_score, where --topk-score gives it).

For each concurrency N, N prompts of n tokens (the pinned held-out corpus, each
from its own offset) are added at once and the engine is stepped by hand. A step
is a decode step of N rows when every request gave one token in it and none gave
its first (no prefill chunk in it); its wall time (scheduling, model, sampling)
is kept. Decode tokens/s = N x those steps / their summed time (the mean: top-k's
decode rows score every topk_refresh positions and keep the selection between, so
a median would leave the scoring steps out); the median is kept beside it. Every
request asks for enough tokens that at least --steps such steps happen before the
first finishes (a multiple of topk_refresh holds whole cycles).
Prefill: prompt tokens / seconds until the last request's first token.

    python benchmarks/topk_concurrency.py --concurrency 1 8        # ~16 min on 2 cores
"""

import argparse
import json
import statistics
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
    p.add_argument("--length", type=int, default=16384, help="prompt tokens of each request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=32, help="decode steps of N rows timed")
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--local-tokens", type=int, default=2048)
    p.add_argument("--distance-cap", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=128, help="vLLM's CPU default, make serve's")
    p.add_argument("--topk-blocks", type=int, default=4)
    p.add_argument("--topk-refresh", type=int, nargs="+", default=[None],
                   help="topk_refresh, an engine each (None: the plugin's default)")
    p.add_argument("--topk-score", choices=("mass", "bound", "mass_int8"), help="default: the plugin's")
    p.add_argument("--step-tokens", type=int, default=2048, help="max_num_batched_tokens (vllm serve's on CPU)")
    p.add_argument("--kv-gib", type=float, default=3)
    p.add_argument("--modes", nargs="+", default=["lambda", "topk"], choices=("lambda", "topk"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/topk-concurrency-16k.json"))
    return p.parse_args(argv)


def engine(args, model, mode, refresh=None):
    from vllm import LLM

    lminf = {"global_tokens": args.global_tokens, "local_tokens": args.local_tokens, "distance_cap": args.distance_cap}
    if mode == "topk":
        lminf["topk_blocks"] = args.topk_blocks
        if refresh is not None:
            lminf["topk_refresh"] = refresh
        if args.topk_score is not None:
            lminf["topk_score"] = args.topk_score
    return LLM(
        model=str(model), attention_backend="lminf", max_model_len=args.length + 4096, seed=0,
        block_size=args.block_size, max_num_batched_tokens=args.step_tokens, enable_prefix_caching=False,
        max_num_seqs=max(256, max(args.concurrency)), kv_cache_memory_bytes=int(args.kv_gib * 2**30),
        additional_config={"lminf": lminf},
    )  # fmt: skip


def measure(llm, args, tokens, n_requests: int) -> dict:
    """N requests at once, stepped by hand: the decode steps of all N rows, and the prefill rate."""
    from vllm import SamplingParams

    core = llm.llm_engine
    prefill_steps = -(-args.length // args.step_tokens)  # (the last request starts decoding after all prefill)
    params = SamplingParams(max_tokens=prefill_steps * n_requests + args.steps + 8, temperature=0.0, ignore_eos=True)
    for j in range(n_requests):
        at = (j * 7919) % len(tokens)
        core.add_request(f"c{n_requests}-{j}", prompt(tokens[at:] + tokens[:at], args.length), params)
    seen: dict[str, int] = {}
    decode_s, started, prefilled_s = [], time.perf_counter(), None
    while core.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = core.step()
        dt = time.perf_counter() - t0
        counts = {o.request_id: len(o.outputs[0].token_ids) for o in outs}
        first = any(seen.get(r, 0) == 0 for r in counts)
        if len(counts) == n_requests and not first and len(seen) == n_requests:
            decode_s.append(dt)
        seen.update(counts)
        if prefilled_s is None and len(seen) == n_requests:
            prefilled_s = time.perf_counter() - started
        if len(decode_s) >= args.steps or any(o.finished for o in outs):
            break
    core.abort_request([f"c{n_requests}-{j}" for j in range(n_requests)])  # nothing more is timed
    while core.has_unfinished_requests():
        core.step()
    step = statistics.fmean(decode_s)
    return {"concurrency": n_requests, "prompt_tokens": args.length, "decode_steps_timed": len(decode_s),
            "decode_step_ms": round(1000 * step, 2), "decode_step_median_ms": round(1000 * statistics.median(decode_s), 2),
            "decode_step_max_ms": round(1000 * max(decode_s), 2), "decode_tok_s": round(n_requests / step, 1),
            "prefill_tok_s": round(n_requests * args.length / prefilled_s, 1)}  # fmt: skip


def main(argv=None):
    in_process_engine_env()
    args = parse_args(argv)
    model, tokens = model_and_tokens(args.model)
    started = time.time()
    rows = []
    engines = [(mode, r) for mode in args.modes for r in (args.topk_refresh if mode == "topk" else [None])]
    for mode, refresh in engines:
        llm = engine(args, model, mode, refresh)
        from vllm import SamplingParams

        llm.generate([prompt(tokens, 256)], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
        cfg = llm.llm_engine.vllm_config
        for n in args.concurrency:
            row = {"mode": mode if mode == "lambda" else f"topk R={cfg.additional_config['lminf_resolved']['topk_refresh']}",
                   **measure(llm, args, tokens, n)}  # fmt: skip
            row.update(dtype=str(cfg.model_config.dtype).removeprefix("torch."),
                       block_size=cfg.cache_config.block_size, compiled=not cfg.model_config.enforce_eager,
                       lminf=cfg.additional_config.get("lminf_resolved"))  # fmt: skip
            rows.append(row)
            print(row, flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
    ratios = {}
    for n in args.concurrency:
        by = {r["mode"]: r for r in rows if r["concurrency"] == n}
        for mode in [m for m in by if m != "lambda" and "lambda" in by]:
            ratios.setdefault(mode, {})[str(n)] = {
                "decode_topk_x_lambda": round(by[mode]["decode_tok_s"] / by["lambda"]["decode_tok_s"], 3),
                "prefill_topk_x_lambda": round(by[mode]["prefill_tok_s"] / by["lambda"]["prefill_tok_s"], 3),
            }
    doc = {"args": {k: str(v) for k, v in vars(args).items()}, "corpus": corpus_info(),
           "command": "python benchmarks/topk_concurrency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seconds": round(time.time() - started), "rows": rows, "ratios": ratios, "cpu": describe()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print("| mode | requests | decode ms/step (mean) | median | max | decode tok/s | prefill tok/s |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        cells = (r["mode"], r["concurrency"], r["decode_step_ms"], r["decode_step_median_ms"], r["decode_step_max_ms"],
                 r["decode_tok_s"], r["prefill_tok_s"])
        print("| " + " | ".join(map(str, cells)) + " |")
    print(json.dumps(ratios, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
