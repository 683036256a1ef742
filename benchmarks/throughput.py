r"""Offline batched generation: prefill and decode speed, lminf next to stock, one run.

For each prompt length both backends serve the same batch on the same model:
the engine's per-request timestamps split each run into prefill and decode.
A warm-up run is not timed; of --repeats timed runs the fastest counts (the
machine is shared: the slower runs measure the neighbours). Prints a table
with the ratio lminf/stock and the KV blocks a sequence holds, and writes JSON
and a PNG.

    python benchmarks/throughput.py --help
    python benchmarks/throughput.py --lengths 1024 2048 8192 32768 --batch 4
    # GPUs, tensor parallel through Ray (not yet run by this project):
    python benchmarks/throughput.py --model MODEL --dtype bfloat16 --backends FLASH_ATTN lminf \
        --lengths 4096 16384 65536 131072 --tensor-parallel-size 2 --executor ray

The default model is the random 2-layer Llama with a 128k RoPE table that
benchmarks/kv_memory.py builds, so stock attention can run every length.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from kv_memory import default_model, in_process_engine_env, page_bytes  # noqa: E402
from shape_args import add_lminf_args  # noqa: E402

from lminf_vllm.block_policy import max_blocks_per_sequence  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="HF model directory (default: random Llama, 128k table)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 8192, 32768])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--gen", type=int, default=128, help="tokens generated per sequence")
    add_lminf_args(p)
    p.add_argument("--step-tokens", type=int, default=4096, help="max_num_batched_tokens")
    p.add_argument("--backends", nargs="+", default=["CPU_ATTN", "lminf"],
                   help="the first is the baseline of the ratios (on GPUs: FLASH_ATTN lminf)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action="store_true", help="torch.compile as vLLM's default (else enforce_eager)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--executor", choices=["mp", "ray"], default=None, help="distributed_executor_backend")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point; the fastest counts")
    p.add_argument("--out", type=Path, default=Path("out/throughput.json"))
    return p.parse_args(argv)


def measure(args, model, backend, n):
    from vllm import LLM, SamplingParams

    lminf = backend == "lminf"
    kv_blocks = args.batch * (-(-(n + args.gen) // args.block_size) + 2)  # room for the full batch, either way
    dtype_bytes = 4 if args.dtype == "float32" else 2
    kv_bytes = kv_blocks * page_bytes(model, args.block_size, dtype_bytes) // args.tensor_parallel_size  # per worker
    llm = LLM(
        model=str(model), dtype=args.dtype, enforce_eager=not args.compile, block_size=args.block_size, seed=0,
        attention_backend=backend, max_model_len=n + args.gen, max_num_seqs=args.batch,
        enable_prefix_caching=False,  # each timed run computes its prompts in full
        disable_log_stats=False,  # per-request timestamps
        tensor_parallel_size=args.tensor_parallel_size, distributed_executor_backend=args.executor,
        max_num_batched_tokens=args.step_tokens, kv_cache_memory_bytes=kv_bytes,
        additional_config={"lminf": {"global_tokens": args.global_tokens, "local_tokens": args.local_tokens,
                                     "distance_cap": args.distance_cap}} if lminf else {},
    )  # fmt: skip
    prompts = [{"prompt_token_ids": [(7 * i + 13 * b) % 250 + 1 for i in range(n)]} for b in range(args.batch)]
    # Warm-up, untimed: the same batch once, so that every KV page has been
    # touched (first-touch page faults would otherwise land in the prefill time).
    llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    prefill = decode = float("inf")
    for _ in range(args.repeats):
        params = SamplingParams(max_tokens=args.gen, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == args.gen for o in outs)
        # The engine's own per-request timestamps: the batch's prefill ends when its
        # last first token comes; decoding is what follows, up to the last token.
        stats = [o.metrics for o in outs]
        prefill = min(prefill, max(m.first_token_ts for m in stats) - min(m.scheduled_ts for m in stats))
        decode = min(decode, max(m.last_token_ts for m in stats) - max(m.first_token_ts for m in stats))
    llm.llm_engine.engine_core.shutdown()
    del llm
    B = args.block_size
    blocks = -(-(n + args.gen) // B)  # decoding; lminf: at most the bound its manager keeps
    if lminf:  # (benchmarks/kv_memory.py reads the blocks held from the manager itself)
        blocks = min(blocks, max_blocks_per_sequence(args.global_tokens, args.local_tokens, B))
    return {
        "kv_blocks_per_seq": blocks,
        "kv_mib_per_seq": round(blocks * page_bytes(model, B) / 2**20, 1),
        "prefill_tok_s": round(args.batch * n / prefill, 1),
        "decode_tok_s": round(args.batch * (args.gen - 1) / decode, 1),
        "ms_per_output_token": round(1000 * decode / (args.gen - 1), 2),
        "prefill_s": round(prefill, 2),
    }


def main(argv=None):
    in_process_engine_env()
    args = parse_args(argv)
    from tqdm import tqdm

    import lminf_vllm

    lminf_vllm.register()
    model = args.model or default_model()
    rows = []
    for n, backend in tqdm([(n, b) for n in args.lengths for b in args.backends], desc="throughput", file=sys.stderr):
        rows.append({"prompt_tokens": n, "backend": backend, **measure(args, model, backend, n)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    recorded = {"cpu": describe(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.write_text(json.dumps(recorded, indent=2))
    print(
        f"\nbatch {args.batch}, {args.gen} tokens generated per sequence; lminf G={args.global_tokens} "
        f"W={args.local_tokens} C={args.distance_cap}; block {args.block_size}; chunks of {args.step_tokens}"
    )
    print("| prompt | backend | prefill tok/s | decode tok/s | ms/output token | prefill x stock | decode x stock "
          "| KV blocks/seq | KV MiB/seq |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    stock = {r["prompt_tokens"]: r for r in rows if r["backend"] == args.backends[0]}
    for r in rows:
        base = stock.get(r["prompt_tokens"])
        ratio = lambda key: f"{r[key] / base[key]:.2f}" if base else "-"  # noqa: E731
        print(f"| {r['prompt_tokens']} | {r['backend']} | {r['prefill_tok_s']} | {r['decode_tok_s']} | "
              f"{r['ms_per_output_token']} | {ratio('prefill_tok_s')} | {ratio('decode_tok_s')} | "
              f"{r['kv_blocks_per_seq']} | {r['kv_mib_per_seq']} |")  # fmt: skip
    plot(rows, args.backends[0], args.out.with_suffix(".png"))
    print(f"\nwrote {args.out}")


def plot(rows, baseline, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill"), (axes[1], "decode_tok_s", "decode")):
        for backend, style in ((baseline, "o-"), ("lminf", "s-")):
            pts = [r for r in rows if r["backend"] == backend]
            ax.plot([r["prompt_tokens"] for r in pts], [r[key] for r in pts], style,
                    label=f"stock ({backend})" if backend == baseline else "lminf")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} throughput")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
