r"""Speed past the window in `make serve`'s own engine: prefill and decode, against inside it.

The engine is the one `make serve` starts (vLLM's defaults: the model's dtype,
bfloat16 for SmolLM2; blocks of 128 on CPU; torch.compile and CUDA-graph-free
CPU execution; serve's step budget of 2,048 tokens; G = 10, W = C = the
model's 8,192 positions; max_model_len 131,072), built in this process with
vllm.LLM so the engine's per-request timestamps can be read. Text is the
pinned held-out corpus, tokenized by the model.

Prefill: an n_in-token prompt (n_in = W: every query inside the window) and
an (n_in + n_past)-token one; the tokens past the window are timed as the
difference of the two, their rate set against the inside prompt's rate. Past
the window each query reads W + G keys, inside it W / 2 on average, so about
0.5x is what the arithmetic allows for attention alone.
Decode: ms per step for a prompt ending just inside the window, and for one
far past it (each step then reads W + G keys).
Stock attention (CPU_ATTN) runs the inside prompts only: past the model's
positions vLLM's RoPE table is read out of bounds (a compiled engine stops).
A warm-up is not timed; of --repeats runs the fastest counts.

    python benchmarks/serve_speed.py                      # lminf, then stock (CPU_ATTN), ~12 min on 2 cores
    python benchmarks/serve_speed.py --backends lminf     # lminf only
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from corpus import corpus_info, held_out_documents  # noqa: E402
from kv_memory import in_process_engine_env  # noqa: E402
from quality import resolve_model  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' or an HF directory")
    p.add_argument("--inside", type=int, default=8192, help="prefill prompt inside the window (= W by default)")
    p.add_argument("--past", type=int, default=4096, help="tokens past the window in the second prompt")
    p.add_argument("--decode-inside", type=int, default=7680, help="prompt whose decode stays inside the window")
    p.add_argument("--decode-past", type=int, default=12288, help="prompt whose decode is past the window")
    p.add_argument("--gen", type=int, default=64, help="decode steps timed")
    p.add_argument("--global-tokens", type=int, default=10, help="make serve's LMINF_CONFIG")
    p.add_argument("--max-model-len", type=int, default=131072, help="make serve's MAX_MODEL_LEN")
    p.add_argument("--step-tokens", type=int, default=2048, help="vllm serve's max_num_batched_tokens on CPU")
    p.add_argument("--kv-gib", type=float, default=4, help="make serve's KV_CACHE_GIB")
    p.add_argument("--backends", nargs="+", default=["lminf", "CPU_ATTN"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve-speed.json"))
    return p.parse_args(argv)


def prompt(tokens: list[int], n: int) -> dict:
    return {"prompt_token_ids": (tokens * (n // len(tokens) + 1))[:n]}


def fastest(llm, prompts, params, repeats, measure):
    best = float("inf")
    for _ in range(repeats):
        best = min(best, measure(llm.generate(prompts, params, use_tqdm=False)[0].metrics))
    return best


def run_backend(args, model, backend, tokens):
    from vllm import LLM, SamplingParams

    lminf = backend == "lminf"
    # Stock attention stops at the model's positions (past them its RoPE table
    # is read out of bounds): it runs only the prompts inside the window.
    max_len = args.max_model_len if lminf else args.inside + 1
    if not lminf:  # the inside prompt's one sampled token sits at position 8,192: never read by the model
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    llm = LLM(
        model=str(model), attention_backend=backend, max_model_len=max_len, seed=0,
        max_num_batched_tokens=args.step_tokens, enable_prefix_caching=False, disable_log_stats=False,
        kv_cache_memory_bytes=int(args.kv_gib * 2**30),
        additional_config={"lminf": {"global_tokens": args.global_tokens}} if lminf else {},
    )  # fmt: skip
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    gen = SamplingParams(max_tokens=args.gen + 1, temperature=0.0, ignore_eos=True)
    prefill_time = lambda m: m.first_token_ts - m.scheduled_ts  # noqa: E731
    decode_step = lambda m: (m.last_token_ts - m.first_token_ts) / args.gen  # noqa: E731
    n_in, n_all = args.inside, args.inside + args.past
    llm.generate([prompt(tokens, n_all if lminf else n_in)], one, use_tqdm=False)  # warm-up: compile, touch pages
    t_in = fastest(llm, [prompt(tokens, n_in)], one, args.repeats, prefill_time)
    d_in = fastest(llm, [prompt(tokens, args.decode_inside)], gen, args.repeats, decode_step)
    if lminf:
        t_all = fastest(llm, [prompt(tokens, n_all)], one, args.repeats, prefill_time)
        d_past = fastest(llm, [prompt(tokens, args.decode_past)], gen, args.repeats, decode_step)
    cfg = llm.llm_engine.vllm_config
    row = {
        "backend": backend,
        "dtype": str(cfg.model_config.dtype).removeprefix("torch."),
        "block_size": cfg.cache_config.block_size,
        "compiled": not cfg.model_config.enforce_eager,
        "lminf": cfg.additional_config.get("lminf_resolved") if lminf else None,
        "prefill_inside_tok_s": round(n_in / t_in, 1),
        "decode_inside_ms": round(1000 * d_in, 2),
    }
    if lminf:
        row["prefill_past_tok_s"] = round(args.past / (t_all - t_in), 1)
        row["decode_past_ms"] = round(1000 * d_past, 2)
        row["prefill_past_x_inside"] = round(row["prefill_past_tok_s"] / row["prefill_inside_tok_s"], 3)
        row["decode_past_x_inside"] = round(row["decode_past_ms"] / row["decode_inside_ms"], 3)
    llm.llm_engine.engine_core.shutdown()
    del llm
    return row


def model_and_tokens(name: str):
    """The model directory and the pinned held-out corpus as one token list, tokenized by the model."""
    import lminf_vllm

    lminf_vllm.register()
    model = resolve_model(name)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return model, [t for _, ids in held_out_documents(0, lambda s: tok.encode(s, add_special_tokens=False)) for t in ids]


def main(argv=None):
    in_process_engine_env()
    args = parse_args(argv)
    model, tokens = model_and_tokens(args.model)
    started = time.time()
    rows = [run_backend(args, model, b, tokens) for b in args.backends]
    doc = {"args": {k: str(v) for k, v in vars(args).items()}, "corpus": corpus_info(),
           "command": "python benchmarks/serve_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seconds": round(time.time() - started), "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**doc, "cpu": describe()}, indent=2) + "\n")
    print(f"\nprefill: {args.inside} tokens inside the window, then {args.past} past it; decode: {args.gen} steps "
          f"at {args.decode_inside} and {args.decode_past} tokens")  # fmt: skip
    print("| backend | prefill inside tok/s | prefill past tok/s | past / inside | decode inside ms | "
          "decode past ms | past / inside |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        past = lambda key: r.get(key, "-")  # noqa: E731  (stock: inside the window only)
        print(f"| {r['backend']} | {r['prefill_inside_tok_s']} | {past('prefill_past_tok_s')} | "
              f"{past('prefill_past_x_inside')} | {r['decode_inside_ms']} | {past('decode_past_ms')} | "
              f"{past('decode_past_x_inside')} |")  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
