"""KV memory per sequence and admitted concurrency: lminf next to stock, one run.

For each prompt length, both backends serve one sequence on the same model and
the same fixed KV pool; the peak number of KV blocks the sequence holds is read
from the engine's own KV manager after every step. The concurrency column is
how many such sequences the pool admits: pool // blocks per sequence, where
lminf's count is the bound its KV spec reports to vLLM's admission control.

    python benchmarks/kv_memory.py --help
    python benchmarks/kv_memory.py --lengths 1024 2048 4096 8192 16384 32768 65536

The default model is a random 2-layer Llama with a 128k RoPE table (memory does
not depend on weights), so stock attention may run every length.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from shape_args import add_lminf_args
from lminf_vllm.cpu_isa import describe


def in_process_engine_env() -> None:
    """Engines in this process, at full speed on CPU, quietly. Called from main()
    (before vLLM is imported), not at import: soak.py and tests import helpers here."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # to read the KV manager
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="HF model directory (default: a random Llama built on the fly)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    add_lminf_args(p)
    p.add_argument("--pool-blocks", type=int, default=4096, help="KV pool size in blocks (both backends)")
    p.add_argument("--step-tokens", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--gen", type=int, default=16, help="tokens generated after each prompt")
    p.add_argument("--backends", nargs="+", default=["CPU_ATTN", "lminf"])
    p.add_argument("--out", type=Path, default=Path("out/kv_memory.json"))
    return p.parse_args(argv)


def default_model() -> Path:
    from lminf_vllm.testing.tiny_models import build_llama

    path = Path(os.environ.get("LMINF_CACHE", Path.home() / ".cache" / "lminf-vllm")) / "bench-llama-128k"
    if not (path / "model.safetensors").exists():
        build_llama(path, max_position_embeddings=131072)
    return path


def page_bytes(model: Path, block_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of one KV block over all layers (K and V), from the model's config."""
    c = json.loads((model / "config.json").read_text())
    head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads", c["num_attention_heads"])
    return c["num_hidden_layers"] * kv_heads * 2 * head * block_size * dtype_bytes


def run_one(args, model, backend, n):
    """Peak KV blocks one sequence of n + gen tokens holds; None if the engine refuses it."""
    from vllm import LLM, SamplingParams

    lminf = backend == "lminf"
    max_len = max(args.lengths) + args.gen
    options = dict(
        model=str(model), dtype="float32", enforce_eager=True, block_size=args.block_size,
        attention_backend=backend, max_num_batched_tokens=args.step_tokens, max_num_seqs=1,
        max_model_len=max_len if lminf else n + args.gen, seed=0,
        additional_config={"lminf": {"global_tokens": args.global_tokens, "local_tokens": args.local_tokens,
                                     "distance_cap": args.distance_cap}} if lminf else {},
    )  # fmt: skip
    page = page_bytes(model, args.block_size)
    try:
        llm = LLM(**options, kv_cache_memory_bytes=args.pool_blocks * page)
    except Exception as error:  # e.g. stock: the pool cannot hold one sequence
        return {"error": str(error).splitlines()[0][:200]}
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    prompt = [(7 * i) % 250 + 1 for i in range(n)]
    engine.add_request("seq", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=args.gen, ignore_eos=True))
    peak = {"prefill": 0, "decode": 0}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        requests = list(scheduler.requests.values())
        phase = "decode" if requests and requests[0].num_computed_tokens >= n else "prefill"
        engine.step()
        held = [sum(not b.is_null for b in blocks) for blocks in manager.req_to_blocks.values()]
        peak[phase] = max([peak[phase], *held])
    seconds = time.perf_counter() - start
    # What admission control reserves for such a sequence: its length in blocks,
    # capped for lminf by the bound its KV spec reports (prefill chunk included).
    need = -(-(n + args.gen) // args.block_size)
    if lminf:
        spec = scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec
        need = min(need, spec.max_admission_blocks_per_request(args.step_tokens, max_len))
    engine.engine_core.shutdown()
    del llm
    return {
        "peak_blocks_prefill": peak["prefill"],
        "peak_blocks_decode": peak["decode"],
        "kv_bytes_per_seq": max(peak.values()) * page,
        "blocks_reserved_by_admission": need,
        "max_concurrent_seqs": args.pool_blocks // need,
        "seconds": round(seconds, 2),
    }


def main(argv=None):
    in_process_engine_env()
    args = parse_args(argv)
    from tqdm import tqdm

    import lminf_vllm

    lminf_vllm.register()
    model = args.model or default_model()
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    jobs = [(n, b) for n in args.lengths for b in args.backends]
    for n, backend in tqdm(jobs, desc="kv_memory", file=sys.stderr):
        row = {"prompt_tokens": n, "backend": backend, **run_one(args, model, backend, n)}
        results["rows"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**results, "cpu": describe()}, indent=2))
    print_table(results["rows"], args)
    print(f"\nwrote {args.out}")
    plot(results["rows"], args, args.out.with_suffix(".png"))


def plot(rows, args, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for backend, style in (("CPU_ATTN", "o-"), ("lminf", "s-")):
        pts = [r for r in rows if r["backend"] == backend and "error" not in r]
        if not pts:
            continue
        label = "stock (CPU_ATTN)" if backend == "CPU_ATTN" else f"lminf G={args.global_tokens} W={args.local_tokens}"
        ax.plot([r["prompt_tokens"] for r in pts], [r["kv_bytes_per_seq"] / 2**20 for r in pts], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("peak KV memory per sequence (MiB)")
    ax.set_title("KV memory per sequence, measured in the engine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def print_table(rows, args):
    print(
        f"\nKV pool {args.pool_blocks} blocks of {args.block_size} tokens; lminf G={args.global_tokens} "
        f"W={args.local_tokens} C={args.distance_cap}; {args.gen} tokens generated per sequence"
    )
    head = ("prompt", "backend", "blocks/seq prefill", "blocks/seq decode", "peak KV MiB/seq", "pool admits seqs", "s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if "error" in r:
            print(f"| {r['prompt_tokens']} | {r['backend']} | refused: {r['error']} |")
            continue
        print(
            f"| {r['prompt_tokens']} | {r['backend']} | {r['peak_blocks_prefill']} | {r['peak_blocks_decode']} | "
            f"{r['kv_bytes_per_seq'] / 2**20:.2f} | {r['max_concurrent_seqs']} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
