r"""What `max_model_len` costs an lminf engine at start-up: time and memory, 131,072 to 2^30.

Each start is a fresh `vllm.LLM` in its own interpreter, with the engine core and
worker in their own process as `vllm serve` runs them, and vLLM's defaults for
everything but the length: 256 request slots, torch.compile, the KV cache lminf
sizes by its per-sequence bound. Measured: seconds from `LLM(...)` to ready, and
the resident memory of the whole process tree once ready; then one short request
checks that the engine serves (its tokens must not depend on the length). The
lengths are started in turn, --rounds times over, after one untimed start per
length that fills torch.compile's cache (keyed by the whole config, the length
included: a first start at a new length compiles, with or without lminf); the
median counts.

    python benchmarks/startup_length.py --out benchmarks/results/startup-length.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SMOLLM2 = Path.home() / ".cache/lminf-vllm/SmolLM2-135M-Instruct"
LENGTHS = [131_072, 1 << 20, 1 << 24, 1 << 30]

PROBE = r"""
import json, sys, time
import psutil

def tree_rss_mib():
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20

if __name__ == "__main__":
    model, length, global_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    from vllm import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model=model, attention_backend="lminf", max_model_len=length, seed=0,
              additional_config={"lminf": {"global_tokens": global_tokens}})
    seconds = time.perf_counter() - t0
    rss = tree_rss_mib()
    out = llm.generate(["The tide came in slowly over the"], SamplingParams(max_tokens=8, temperature=0.0),
                       use_tqdm=False)[0]
    config = llm.llm_engine.vllm_config
    print("PROBE", json.dumps({"seconds": seconds, "rss_mib": rss, "tokens": list(out.outputs[0].token_ids),
                               "max_num_seqs": config.scheduler_config.max_num_seqs,
                               "dtype": str(config.model_config.dtype),
                               "block_size": config.cache_config.block_size}), flush=True)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", str(SMOLLM2)], help="'tiny' (a random 2-layer Llama) or paths")
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--rounds", type=int, default=2, help="starts per length (after one untimed warm-up start)")
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("out/startup-length.json"))
    return p.parse_args(argv)


def start(model: str, length: int, global_tokens: int, script: Path) -> dict:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # make serve's
    run = subprocess.run([sys.executable, str(script), model, str(length), str(global_tokens)],
                         env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    line = next((x for x in run.stdout.splitlines() if x.startswith("PROBE ")), None)
    if run.returncode != 0 or line is None:
        return {"error": run.stderr[-2000:]}
    return json.loads(line.removeprefix("PROBE "))


def tiny_model(folder: Path) -> Path:
    from lminf_vllm.testing.tiny_models import build_llama

    # 2 layers, rotary dim 32: the shape the issue measured; its own tokenizer
    return build_llama(folder / "tiny-llama", max_position_embeddings=4096, hidden_size=128, num_layers=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    from lminf_vllm.cpu_isa import describe

    results = {"command": "python benchmarks/startup_length.py " + " ".join(argv or sys.argv[1:]),
               "cpu": describe(), "lengths": args.lengths, "rounds": args.rounds, "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "probe.py"
        script.write_text(PROBE)
        for name in args.models:
            model = str(tiny_model(Path(tmp))) if name == "tiny" else name
            label = "tiny-llama-2-layers" if name == "tiny" else Path(name).name
            for n in args.lengths:  # torch.compile's cache is keyed by the config, max_model_len included
                start(model, n, args.global_tokens, script)
            runs = {n: [] for n in args.lengths}
            for r in range(args.rounds):
                for n in args.lengths:
                    t = time.perf_counter()
                    runs[n].append(start(model, n, args.global_tokens, script))
                    print(f"{label} max_model_len={n} round {r}: {runs[n][-1].get('seconds', 'error'):.5} s to ready, "
                          f"{runs[n][-1].get('rss_mib', float('nan')):.0f} MiB ({time.perf_counter() - t:.0f} s wall)", flush=True)  # fmt: skip
            summary = {}
            for n, rs in runs.items():
                ok = [x for x in rs if "error" not in x]
                summary[str(n)] = {
                    "runs": rs,
                    "seconds_median": statistics.median(x["seconds"] for x in ok) if ok else None,
                    "rss_mib_median": statistics.median(x["rss_mib"] for x in ok) if ok else None,
                    "same_tokens_as_first_length": all(x["tokens"] == runs[args.lengths[0]][0].get("tokens") for x in ok),
                }
            base = summary[str(args.lengths[0])]
            for n in args.lengths:
                s = summary[str(n)]
                if s["seconds_median"] and base["seconds_median"]:
                    s["seconds_ratio"] = s["seconds_median"] / base["seconds_median"]
                    s["rss_mib_delta"] = s["rss_mib_median"] - base["rss_mib_median"]
            results["models"][label] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for label, summary in results["models"].items():
        for n, s in summary.items():
            print(f"{label:28s} {int(n):>13,d}: {s['seconds_median']} s, {s['rss_mib_median']} MiB, "
                  f"x{s.get('seconds_ratio', float('nan')):.2f}, {s.get('rss_mib_delta', float('nan')):+.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
