r"""The cost of one decode step against the batch (1 to 64 rows), lminf next to stock.

One in-process engine per mode; for each batch size b it admits b requests
(request k's prompt is the mode's length plus k % B tokens, so that the rows
of a step sit at every offset of their last block, as in serving), steps the
engine until every one of them decodes, then times --steps engine steps in
which all b rows decode one token each, and aborts them; of --repeats such
runs the fastest mean counts.
The modes, in pairs at the same number of keys per row:

  * stock-inside and lminf-inside: prompts of W/2 - B tokens, inside the
    window (lminf's rows are plain: vLLM's own kernel call);
  * stock at prompts of W tokens (each row reads about W + B/2 keys) and
    lminf-past at --past-factor x W, past the window (each row reads W + G
    keys): the rows Λ-attention plans for itself.

A least-squares line through (b, ms/step) per mode gives the per-row slope:
what one more decoding row costs. `--profile B` instead profiles (cProfile)
the timed steps of the lminf past-window mode at batch B and prints the
functions that cost the most.

    python benchmarks/decode_batch.py                                  # small random Llama, ~6 min
    python benchmarks/decode_batch.py --profile 64 --modes lminf-past

The default model is the small random Llama of benchmarks/saturation.py
(4 layers, hidden 256, 4/2 heads of 64, float32).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from kv_memory import in_process_engine_env, page_bytes  # noqa: E402

from lminf_vllm.cpu_isa import describe  # noqa: E402

MODES = ("stock-inside", "lminf-inside", "stock", "lminf-past")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="'small' (random 4-layer Llama), 'smollm2' or an HF directory")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 48, 64])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--global-tokens", type=int, default=4)
    p.add_argument("--local-tokens", type=int, default=512, help="W (= C): stock's prompt too")
    p.add_argument("--past-factor", type=int, default=4, help="lminf-past's prompt: this many times W")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action="store_true", help="torch.compile (else enforce_eager)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch (one block's worth: "
                   "every row crosses a block boundary once); the mean counts")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size; the fastest mean counts")
    p.add_argument("--profile", type=int, default=0, metavar="B", help="cProfile the timed steps at batch B")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode-batch.json"))
    return p.parse_args(argv)


def resolve(name: str) -> Path:
    if name == "small":
        from saturation import small_model

        return small_model()
    from quality import resolve_model

    return resolve_model(name)


def prompt_len(args, mode: str) -> int:
    """The shortest prompt of the mode; request k adds k % block_size tokens, so that the rows
    of a step sit at every offset within their last block, as in serving."""
    if mode.endswith("inside"):
        return args.local_tokens // 2 - args.block_size
    return args.local_tokens * (args.past_factor if mode == "lminf-past" else 1)


def keys_per_row(args, mode: str) -> int:
    n = prompt_len(args, mode) + args.block_size // 2
    return min(n, args.local_tokens + args.global_tokens) if mode.startswith("lminf") else n


def make_engine(args, model: Path, mode: str):
    from vllm import LLM

    lminf = mode.startswith("lminf")
    n, b = prompt_len(args, mode), max(args.batches)
    max_len = n + 4 * args.steps + 4096  # room for the steps decoded while others still prefill
    blocks = b * (-(-max_len // args.block_size) + 2)
    dtype_bytes = 4 if args.dtype == "float32" else 2
    return LLM(
        model=str(model), dtype=args.dtype, enforce_eager=not args.compile, block_size=args.block_size, seed=0,
        attention_backend="lminf" if lminf else "CPU_ATTN", max_model_len=max_len, max_num_seqs=b,
        enable_prefix_caching=False, max_num_batched_tokens=4096,
        kv_cache_memory_bytes=blocks * page_bytes(model, args.block_size, dtype_bytes),
        additional_config={"lminf": {"global_tokens": args.global_tokens, "local_tokens": args.local_tokens,
                                     "distance_cap": args.local_tokens}} if lminf else {},
    )  # fmt: skip


def time_batch(args, llm, mode: str, b: int, tag: str, profiler=None) -> dict:
    """Median ms of an engine step in which b rows decode."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    n = prompt_len(args, mode)
    params = SamplingParams(max_tokens=4096, ignore_eos=True, temperature=0.0, detokenize=False)
    ids = [f"{tag}-{b}-{k}" for k in range(b)]
    for k, rid in enumerate(ids):
        prompt = [(7 * i + 13 * k) % 250 + 1 for i in range(n + k % args.block_size)]
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    while True:  # until every row decodes
        reqs = [scheduler.requests[r] for r in scheduler.requests if r.startswith(f"{tag}-{b}-")]
        if len(reqs) == b and all(r.num_computed_tokens >= r.num_prompt_tokens for r in reqs) and \
                len(scheduler.running) == b:  # fmt: skip
            break
        engine.step()
    for _ in range(2):  # settle
        engine.step()
    times = []
    if profiler:
        profiler.enable()
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    if profiler:
        profiler.disable()
    assert len(scheduler.running) == b, (len(scheduler.running), b)
    engine.abort_request([r for r in scheduler.requests if r.startswith(f"{tag}-")], internal=True)
    while engine.has_unfinished_requests():
        engine.step()
    return {"batch": b, "ms_per_step": round(1000 * statistics.fmean(times), 3),
            "ms_per_step_median": round(1000 * statistics.median(times), 3)}  # fmt: skip


def slope(points: list[dict]) -> tuple[float, float]:
    """Least-squares (intercept ms, ms per added row) of ms_per_step against batch."""
    xs, ys = [p["batch"] for p in points], [p["ms_per_step"] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - k * mx, k


def main(argv=None):
    in_process_engine_env()
    args = parse_args(argv)
    import lminf_vllm

    lminf_vllm.register()
    model = resolve(args.model)
    if args.profile:
        import cProfile
        import pstats

        mode = args.modes[0]
        llm = make_engine(args, model, mode)
        time_batch(args, llm, mode, args.profile, "warm")
        prof = cProfile.Profile()
        r = time_batch(args, llm, mode, args.profile, "prof", prof)
        print(f"{mode} batch {args.profile}: {r['ms_per_step']} ms/step (under cProfile)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        return
    results = {"cpu": describe(), "args": {k: str(v) for k, v in vars(args).items()}, "modes": []}
    started = time.time()
    for mode in args.modes:
        llm = make_engine(args, model, mode)
        time_batch(args, llm, mode, min(args.batches), "warm")  # first-call costs
        points = []
        for b in args.batches:  # the machine is shared: of --repeats runs, the fastest counts
            runs = [time_batch(args, llm, mode, b, f"run{k}") for k in range(args.repeats)]
            points.append(min(runs, key=lambda r: r["ms_per_step"]))
            print(f"{mode} batch {b}: {points[-1]['ms_per_step']} ms/step", file=sys.stderr, flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
        intercept, per_row = slope(points)
        big = [p for p in points if p["batch"] >= 16]
        _, per_row_large = slope(big) if len(big) >= 2 else (None, None)
        results["modes"].append({
            "mode": mode, "backend": "lminf" if mode.startswith("lminf") else "CPU_ATTN",
            "prompt_tokens": prompt_len(args, mode), "keys_per_row": keys_per_row(args, mode),
            "points": points, "intercept_ms": round(intercept, 3), "ms_per_row": round(per_row, 4),
            "ms_per_row_b16_up": None if per_row_large is None else round(per_row_large, 4),
        })  # fmt: skip
    results["seconds"] = round(time.time() - started)
    for m in results["modes"]:
        yardstick = "stock-inside" if m["mode"].endswith("inside") else "stock"
        stock = next((s for s in results["modes"] if s["mode"] == yardstick), None)
        if stock and m is not stock:
            m["per_row_x_stock"] = round(m["ms_per_row"] / stock["ms_per_row"], 3)
            if m["ms_per_row_b16_up"] and stock["ms_per_row_b16_up"]:
                m["per_row_b16_up_x_stock"] = round(m["ms_per_row_b16_up"] / stock["ms_per_row_b16_up"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| mode | prompt | " + " | ".join(f"b={b}" for b in args.batches) + " | ms/row | ms/row (b>=16) |")
    for m in results["modes"]:
        print(f"| {m['mode']} | {m['prompt_tokens']} | " + " | ".join(str(p["ms_per_step"]) for p in m["points"])
              + f" | {m['ms_per_row']} | {m['ms_per_row_b16_up']} |")  # fmt: skip
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for m, style in zip(results["modes"], ("o:", "s:", "o-", "s-")):
        xs = [p["batch"] for p in m["points"]]
        ax.plot(xs, [p["ms_per_step"] for p in m["points"]], style,
                label=f"{m['mode']} ({m['prompt_tokens']}-token prompts): {m['ms_per_row']:.3f} ms/row")  # fmt: skip
    ax.set_xlabel("rows decoding in the step (batch)")
    ax.set_ylabel("ms per decode step (mean, fastest run)")
    ax.set_title("Decode step against the batch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
