r"""vLLM's own offline benchmark, `vllm bench throughput`, with lminf next to stock.

For each prompt length, the same command runs twice on the same random
prompts (vLLM's `random` dataset, fixed seed): once with vLLM's stock CPU
backend, once with `--attention-backend lminf` and make serve's settings.
This script only starts the commands and gathers their `--output-json`;
every number is vLLM's. Stock attention cannot run past the model's own
positions (vLLM's RoPE table ends there), so those rows are lminf's alone.

    python benchmarks/vllm_bench.py                           # ~15 min on 2 cores
    python benchmarks/vllm_bench.py --lengths 4096 --num-prompts 8
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from quality import resolve_model  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402

VLLM = Path(sys.executable).with_name("vllm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' or an HF directory")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 12288], help="prompt tokens (--input-len)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--global-tokens", type=int, default=10, help="make serve's LMINF_CONFIG")
    p.add_argument("--kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE, as make serve sets it")
    p.add_argument("--backends", nargs="+", default=["CPU_ATTN", "lminf"], help="the first is the baseline")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm-bench-throughput.json"))
    return p.parse_args(argv)


def bench_command(args, model: Path, backend: str, n: int, out_json: Path) -> list[str]:
    cmd = [str(VLLM), "bench", "throughput", "--model", str(model), "--dataset-name", "random",
           "--random-input-len", str(n), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts), "--random-range-ratio", "0", "--seed", "0",
           "--max-model-len", str(n + args.output_len + 64),
           "--attention-backend", backend, "--output-json", str(out_json)]  # fmt: skip
    if backend == "lminf":
        cmd += ["--additional-config", json.dumps({"lminf": {"global_tokens": args.global_tokens}})]
    return cmd


def run(args, model, backend, n) -> dict:
    positions = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    if backend != "lminf" and n + args.output_len > positions:
        return {"prompt_tokens": n, "backend": backend, "skipped": f"past the model's {positions} positions"}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib)}
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "result.json"
        cmd = bench_command(args, model, backend, n, out_json)
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)
        result = json.loads(out_json.read_text())
    return {"prompt_tokens": n, "backend": backend, "command": " ".join(cmd[1:]).replace(str(model), "MODEL"),
            **{k: result[k] for k in ("elapsed_time", "num_requests", "total_num_tokens", "requests_per_second",
                                      "tokens_per_second")}}  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    model = resolve_model(args.model)
    rows = [run(args, model, b, n) for n in args.lengths for b in args.backends]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    recorded = {"cpu": describe(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.write_text(json.dumps(recorded, indent=2) + "\n")
    base = {r["prompt_tokens"]: r for r in rows if r["backend"] == args.backends[0]}
    print(f"\nvllm bench throughput: {args.num_prompts} prompts, {args.output_len} tokens out each")
    print(f"| prompt | backend | requests/s | tokens/s | x {args.backends[0]} |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['prompt_tokens']} | {r['backend']} | {r['skipped']} | | |")
            continue
        b = base.get(r["prompt_tokens"], {})
        ratio = f"{r['tokens_per_second'] / b['tokens_per_second']:.2f}x" if "tokens_per_second" in b else "-"
        print(f"| {r['prompt_tokens']} | {r['backend']} | {r['requests_per_second']:.3f} | "
              f"{r['tokens_per_second']:.1f} | {ratio} |")  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
