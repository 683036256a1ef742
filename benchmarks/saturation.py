r"""Batched serving at saturation: `vllm serve` under `vllm bench serve`, one fixed KV budget.

For each mode (stock CPU_ATTN, lminf, lminf with topk_blocks) this starts one
`vllm serve` of the same model with the same KV budget (--kv-cache-memory-bytes),
then runs vLLM's own client, `vllm bench serve` (random prompts, fixed seed,
--ignore-eos), once per scenario against it. A scenario is a prompt length
(mean, with vLLM's --random-range-ratio), an output length, a number of
prompts and a request rate (inf: all at once) or a --max-concurrency cap.
While a client runs, a thread reads the server's /metrics every 0.25 s: the
most requests running at once (vllm:num_requests_running), their mean while
any ran, and the preemptions (vllm:num_preemptions, counted over the run).
Every other number is vLLM's client's: output tokens/s, TTFT and TPOT p50/p99.

    python benchmarks/saturation.py --preset small      # the issue's small Llama, 96 MiB of KV
    python benchmarks/saturation.py --preset smollm2    # SmolLM2 in make serve's engine
    python benchmarks/saturation.py --preset small --modes lminf --scenarios saturate-12w

Presets set the model, the engine and the scenarios; each option below
overrides its part. Writes --out (JSON; benchmarks/report.py renders it into
docs/speed.md) and a PNG beside it. Every server it starts is stopped before
it returns.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=256, num_heads=4, num_kv_heads=2, num_layers=4, max_position_embeddings=16384)

# name: (mean prompt tokens, range ratio, output tokens, prompts, request rate, max concurrency)
PRESETS = {
    "small": {
        "model": "small", "dtype": "float32", "block_size": 32, "compile": False, "kv_mib": 96,
        "lminf": {"global_tokens": 4, "local_tokens": 512, "distance_cap": 512}, "topk_blocks": 2,
        "scenarios": {
            "batch1-inside": (384, 0.0, 128, 6, "inf", 1),
            "light-mixed": (1280, 0.8, 128, 16, "2", None),
            "saturate-mixed": (1280, 0.8, 128, 48, "inf", None),
            "saturate-12w": (6144, 0.0, 128, 48, "inf", None),
        },
    },
    "smollm2": {  # make serve's engine (dtype auto: bfloat16 here, blocks of 128, torch.compile), a smaller W
        "model": "smollm2", "dtype": "auto", "block_size": None, "compile": True, "kv_mib": 135,  # 48 blocks
        "lminf": {"global_tokens": 10, "local_tokens": 256, "distance_cap": 256}, "topk_blocks": 2,
        "scenarios": {
            "batch1-inside": (192, 0.0, 64, 3, "inf", 1),
            "saturate-6w": (1536, 0.33, 256, 16, "inf", None),
        },
    },
}


def small_model() -> Path:
    """The issue's small random Llama: 4 layers, hidden 256, 4/2 heads of 64, a 16k RoPE table."""
    from lminf_vllm.testing.tiny_models import build_llama

    path = Path(os.environ.get("LMINF_CACHE", Path.home() / ".cache" / "lminf-vllm")) / "bench-llama-4x256"
    if not (path / "model.safetensors").exists():
        build_llama(path, **SMALL)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--modes", nargs="+", default=["stock", "lminf", "lminf-topk"],
                   choices=["stock", "lminf", "lminf-topk"])  # fmt: skip
    p.add_argument("--scenarios", nargs="+", default=None, help="names from the preset (default: all)")
    p.add_argument("--kv-mib", type=int, default=None, help="the KV budget of every mode, MiB")
    p.add_argument("--lminf", default=None, help="additional_config.lminf JSON (default: the preset's)")
    p.add_argument("--topk-blocks", type=int, default=None)
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout whose lminf_vllm the servers import "
                   "(default this one; e.g. an export of another commit, for a before/after)")
    p.add_argument("--port", type=int, default=8311)
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/saturation-PRESET.json")
    return p.parse_args(argv)


def resolve_model(name: str) -> Path:
    if name == "small":
        return small_model()
    sys.path.insert(0, str(Path(__file__).parent))
    from quality import resolve_model as resolve

    return resolve(name)


def vllm_bin() -> str:
    return str(Path(sys.executable).with_name("vllm"))


def shown(argv: list[str]) -> str:
    return shlex.join([Path(argv[0]).name, *argv[1:]]).replace(str(Path.home()), "~")


class Scraper(threading.Thread):
    """Polls /metrics: requests running (max, mean while any), waiting (max), preemptions (delta), KV use (max)."""

    def __init__(self, url: str, period: float = 0.25):
        super().__init__(daemon=True)
        self.url, self.period, self.stop_flag = url, period, threading.Event()
        self.samples: list[dict] = []

    def read(self) -> dict:
        import requests
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(f"{self.url}/metrics", timeout=5).text
        want = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
                "vllm:num_preemptions": "preemptions", "vllm:kv_cache_usage_perc": "kv_use"}  # fmt: skip
        out = {}
        for fam in text_string_to_metric_families(text):
            if fam.name in want:
                out[want[fam.name]] = sum(s.value for s in fam.samples if not s.name.endswith("_created"))
        return out

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                self.samples.append({"t": time.time(), **self.read()})
            except Exception:  # noqa: BLE001 (a missed sample is not an error)
                pass
            self.stop_flag.wait(self.period)

    def finish(self) -> dict:
        self.stop_flag.set()
        self.join()
        s = [x for x in self.samples if "running" in x]
        busy = [x["running"] for x in s if x["running"] > 0]
        return {
            "max_running": int(max((x["running"] for x in s), default=0)),
            "mean_running": round(sum(busy) / len(busy), 2) if busy else 0,
            "max_waiting": int(max((x.get("waiting", 0) for x in s), default=0)),
            "preemptions": int(s[-1].get("preemptions", 0) - s[0].get("preemptions", 0)) if s else None,
            "max_kv_use": round(max((x.get("kv_use", 0) for x in s), default=0), 3),
            "metrics_samples": len(s),
        }


def serve_argv(args, preset, model: Path, mode: str, port: int, max_len: int) -> list[str]:
    argv = [vllm_bin(), "serve", str(model), "--served-model-name", "model", "--host", "127.0.0.1",
            "--port", str(port), "--dtype", preset["dtype"], "--seed", "0",
            "--kv-cache-memory-bytes", str(args.kv_mib * 2**20), "--max-num-seqs", "128"]  # fmt: skip
    if preset["block_size"]:
        argv += ["--block-size", str(preset["block_size"])]
    if not preset["compile"]:
        argv += ["--enforce-eager"]
    if mode == "stock":
        return argv + ["--attention-backend", "CPU_ATTN", "--max-model-len", str(max_len)]
    cfg = dict(args.lminf_cfg, **({"topk_blocks": args.topk} if mode == "lminf-topk" else {}))
    return argv + ["--attention-backend", "lminf", "--additional-config", json.dumps({"lminf": cfg}),
                   "--max-model-len", str(1 << 20)]  # fmt: skip


def bench_argv(url: str, model: Path, result_dir: Path, name: str, scenario) -> list[str]:
    n, ratio, out, prompts, rate, conc = scenario
    argv = [vllm_bin(), "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", "model",
            "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", str(n),
            "--random-range-ratio", str(ratio), "--random-output-len", str(out), "--ignore-eos",
            "--num-prompts", str(prompts), "--seed", "0", "--request-rate", str(rate),
            "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{name}.json"]  # fmt: skip
    if conc:
        argv += ["--max-concurrency", str(conc)]
    return argv


def warm_up(url: str, length: int) -> None:
    import requests

    body = {"model": "model", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    for n in (length, 8):
        requests.post(f"{url}/v1/completions", json={**body, "prompt": [100 + i % 150 for i in range(n)]},
                      timeout=1800).raise_for_status()  # fmt: skip


KEEP = ("completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "total_token_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms", "p50_e2el_ms", "p99_e2el_ms")  # fmt: skip


def run_mode(args, preset, model, mode, scenarios, work: Path, port: int) -> list[dict]:
    # (the client's random prompts are text: re-tokenized, one may come out a little longer)
    max_len = int(1.25 * max(int(n * (1 + r)) + out for n, r, out, *_ in scenarios.values())) + 64
    argv = serve_argv(args, preset, model, mode, port, max_len)
    print("$", shown(argv), file=sys.stderr, flush=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from soak import ServeProcess

    # The budget is --kv-cache-memory-bytes; no CPU reserved, as make serve on <= 4 cores.
    env = {"VLLM_CPU_KVCACHE_SPACE": None,
           "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")}  # fmt: skip
    server = ServeProcess(argv, port, work / f"server-{mode}.log", args.code_dir, env)
    rows = []
    try:
        t0 = time.time()
        server.wait_ready()
        startup = time.time() - t0
        warm_up(server.url, min(2048, max(n for n, *_ in scenarios.values())))
        for name, sc in scenarios.items():
            bargv = bench_argv(server.url, model, work, f"{mode}-{name}", sc)
            print("$", shown(bargv), file=sys.stderr, flush=True)
            scraper = Scraper(server.url)
            scraper.start()
            t = time.time()
            done = subprocess.run(bargv, stdout=open(work / f"client-{mode}-{name}.log", "w"),
                                  stderr=subprocess.STDOUT, timeout=3600)  # fmt: skip
            wall = time.time() - t
            seen = scraper.finish()
            if done.returncode:
                print((work / f"client-{mode}-{name}.log").read_text()[-3000:], file=sys.stderr, flush=True)
                continue
            res = json.loads((work / f"{mode}-{name}.json").read_text())
            n, ratio, out, prompts, rate, conc = sc
            row = {"mode": mode, "scenario": name, "input_len": n, "range_ratio": ratio, "output_len": out,
                   "num_prompts": prompts, "request_rate": rate, "max_concurrency": conc,
                   **{k: res.get(k) for k in KEEP}, **seen, "client_wall_s": round(wall, 1),
                   "command": shown(bargv).replace(server.url, "URL").replace(str(work), "DIR")}  # fmt: skip
            rows.append(row)
            print(f"{mode} {name}: {row['output_throughput']:.1f} out tok/s, TTFT p99 {row['p99_ttft_ms']:.0f} ms, "
                  f"max running {row['max_running']}, preemptions {row['preemptions']}", file=sys.stderr, flush=True)
        log = server.log_path.read_text(errors="replace")
    finally:
        server.stop()
    for r in rows:
        r["server_command"] = shown(argv).replace(str(model), "MODEL")
        r["server_startup_s"] = round(startup, 1)
    lminf_lines = [line for line in log.splitlines() if "lminf attention:" in line or "KV cache" in line][:4]
    rows and rows[0].update({"server_log_lines": lminf_lines})
    return rows


def main(argv=None):
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    args.kv_mib = args.kv_mib or preset["kv_mib"]
    args.lminf_cfg = json.loads(args.lminf) if args.lminf else preset["lminf"]
    args.topk = args.topk_blocks if args.topk_blocks is not None else preset["topk_blocks"]
    names = args.scenarios or list(preset["scenarios"])
    scenarios = {k: preset["scenarios"][k] for k in names}
    model = resolve_model(preset["model"])
    out = args.out or ROOT / f"benchmarks/results/saturation-{args.preset}.json"
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(Path(__file__).parent))
        from mixed_ttft import snapshot_package

        args.code_dir, digest = snapshot_package(Path(tmp), args.code)  # every server of the run imports this copy
        for k, mode in enumerate(args.modes):
            try:
                rows += run_mode(args, preset, model, mode, scenarios, Path(tmp), args.port + k)
            except Exception as error:  # noqa: BLE001 (the other modes still run; the log says why)
                print(f"{mode} failed: {error}", file=sys.stderr, flush=True)
                log = Path(tmp) / f"server-{mode}.log"
                print(log.read_text(errors="replace")[-3000:] if log.exists() else "", file=sys.stderr, flush=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from lminf_vllm.cpu_isa import describe

    previous = json.loads(out.read_text()) if out.exists() else {}
    kept = [r for r in previous.get("rows", []) if (r["mode"], r["scenario"]) not in {(x["mode"], x["scenario"]) for x in rows}]
    recorded = {
        "cpu": describe(), "preset": args.preset, "model": preset["model"], "kv_mib": args.kv_mib,
        "lminf": args.lminf_cfg, "topk_blocks": args.topk,
        "engine": {k: preset[k] for k in ("dtype", "block_size", "compile")},
        "args": {k: str(v) for k, v in vars(args).items()
                 if k not in ("lminf_cfg", "topk", "code_dir") and not (k == "code" and v == ROOT)},
        "code_digest": digest,
        "seconds": round(time.time() - started) + previous.get("seconds", 0) if kept else round(time.time() - started),
        "rows": kept + rows,
        # every invocation whose rows the file holds (a later one replaces the rows of its modes and scenarios)
        "commands": (previous.get("commands", []) if kept else []) + [shown(["python", *sys.argv]).replace(str(ROOT) + "/", "")],
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recorded, indent=2) + "\n")
    print_table(recorded["rows"])
    plot(recorded, out.with_suffix(".png"))
    print(f"wrote {out}")


def print_table(rows):
    print("| scenario | mode | out tok/s | x stock | TTFT p50/p99 ms | TPOT p50/p99 ms | max running | preemptions |")
    stock = {r["scenario"]: r for r in rows if r["mode"] == "stock"}
    for r in rows:
        s = stock.get(r["scenario"])
        x = f"{r['output_throughput'] / s['output_throughput']:.2f}x" if s else "-"
        print(f"| {r['scenario']} | {r['mode']} | {r['output_throughput']:.1f} | {x} | {r['p50_ttft_ms']:.0f}/"
              f"{r['p99_ttft_ms']:.0f} | {r['p50_tpot_ms']:.1f}/{r['p99_tpot_ms']:.1f} | {r['max_running']} | "
              f"{r['preemptions']} |")  # fmt: skip


def plot(recorded, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = recorded["rows"]
    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        by = {r["scenario"]: r for r in rows if r["mode"] == mode}
        xs = [i + k * width for i in range(len(scen))]
        for ax, key in zip(axes, ("output_throughput", "p99_ttft_ms", "max_running")):
            ax.bar(xs, [by[s][key] if s in by else 0 for s in scen], width, label=mode)
    for ax, title in zip(axes, ("output tokens/s", "TTFT p99 (ms)", "most requests running at once")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(scen))], scen, rotation=20, fontsize=8)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{recorded['preset']}: KV budget {recorded['kv_mib']} MiB, lminf {recorded['lminf']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
