"""A long prompt and short requests: time to first token, measured with `vllm bench serve`.

For each variant this starts the server `make serve` starts (`vllm serve` of
SmolLM2-135M-Instruct with `--attention-backend lminf`, G=10, max_model_len
131072, VLLM_CPU_KVCACHE_SPACE=4) on 127.0.0.1 with the variant's extra
options, then runs two of vLLM's own clients against it at once:

  * the long client, `vllm bench serve` with one ~10,000-token random prompt;
  * the short client, started right after it: `vllm bench serve` with short
    random prompts (8-24 tokens, 16 generated) at a fixed low request rate.

It reports the short requests' time to first token (vLLM's mean, median and
p99, and the same over the short requests sent while the long prompt was still
prefilling) and the long request's time to first token (its prefill). The
variants: `before`, vLLM's uncapped prefill chunks (a long prompt takes the
whole step budget every step), and `after`, lminf's default
`long_prefill_token_threshold` (lminf_vllm/vllm_config.py); `--variant
NAME=ARGS` adds more. Both clients' start times are read from
`--save-detailed` results (time.perf_counter, one clock for every process on
the machine).

    python benchmarks/mixed_ttft.py                       # before and after
    python benchmarks/mixed_ttft.py --variant 'cap-256=--long-prefill-token-threshold 256'

Writes --out (JSON, rendered into docs/serving.md by benchmarks/report.py) and
prints a table. Every server it starts is stopped before it returns.
"""

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))

from soak import ServeProcess  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path.home() / ".cache" / "lminf-vllm" / "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 131072
UNCAPPED = ["--long-prefill-token-threshold", str(MAX_MODEL_LEN)]  # a cap no prompt reaches: vLLM's chunks
BUILTIN = {"before": UNCAPPED, "after": []}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"model directory, its tokenizer the clients' (default {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default="SmolLM2-135M-Instruct")
    p.add_argument("--lminf", default='{"global_tokens": 10}', help="additional_config.lminf, as make serve")
    p.add_argument("--kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE, as make serve")
    p.add_argument("--port", type=int, default=8231, help="first port; each variant takes the next one")
    p.add_argument("--long-input", type=int, default=10000, help="tokens of the long prompt")
    p.add_argument("--long-output", type=int, default=16)
    p.add_argument("--short-input", type=int, default=16, help="mean tokens of a short prompt")
    p.add_argument("--short-range-ratio", type=float, default=0.5, help="short prompts: input x (1 +- this)")
    p.add_argument("--short-output", type=int, default=16)
    p.add_argument("--short-rate", type=float, default=0.5, help="short requests per second (Poisson)")
    p.add_argument("--short-prompts", type=int, default=24)
    p.add_argument("--short-delay", type=float, default=2.0, help="seconds between starting the two clients")
    p.add_argument("--variants", nargs="+", default=["before", "after"], help="which to run, in order: "
                   "before, after and --variant names")  # fmt: skip
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="another variant: NAME and the extra `vllm serve` options it adds")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results/mixed-ttft.json")
    return p.parse_args(argv)


def vllm_bin() -> str:
    return str(Path(sys.executable).with_name("vllm"))


def snapshot_package(work: Path, root: Path = ROOT) -> tuple[Path, str]:
    """A copy of root's lminf_vllm that every server of this run imports (PYTHONPATH wins over
    the editable install), so that all variants run the same code; and its digest."""
    code = work / "code"
    shutil.copytree(root / "lminf_vllm", code / "lminf_vllm", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for path in sorted((code / "lminf_vllm").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(code)).encode() + b"\0" + path.read_bytes())
    return code, digest.hexdigest()[:12]


def start_server(args, port: int, extra: list[str], log_path: Path, code: Path) -> ServeProcess:
    argv = [
        vllm_bin(), "serve", args.model, "--served-model-name", args.served_model_name,
        "--attention-backend", "lminf", "--additional-config", json.dumps({"lminf": json.loads(args.lminf)}),
        "--max-model-len", str(MAX_MODEL_LEN), "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip
    return ServeProcess(argv, port, log_path, code, {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)})


def bench_argv(args, url: str, result_dir: Path, name: str, input_len: int, range_ratio: float, output_len: int,
               num_prompts: int, rate: float | None, seed: int) -> list[str]:  # fmt: skip
    argv = [
        vllm_bin(), "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", args.served_model_name,
        "--tokenizer", args.model, "--dataset-name", "random", "--random-input-len", str(input_len),
        "--random-range-ratio", str(range_ratio), "--random-output-len", str(output_len), "--ignore-eos",
        "--num-prompts", str(num_prompts), "--seed", str(seed), "--ready-check-timeout-sec", "0",
        "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
        "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", f"{name}.json",
    ]  # fmt: skip
    if rate is not None:
        argv += ["--request-rate", str(rate)]
    return argv


def shown(argv: list[str], args) -> str:
    """A command line as the docs show it: ~ for the home directory, no temporary paths."""
    text = shlex.join([Path(argv[0]).name, *argv[1:]])
    return text.replace(str(Path.home()), "~")


def warm_up(server: ServeProcess, args) -> None:
    """One prompt of two full steps and one short one, so that neither run pays first-call costs."""
    body = {"model": args.served_model_name, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    requests.post(f"{server.url}/v1/completions", json={**body, "prompt": [100 + i % 1000 for i in range(4200)]},
                  timeout=900).raise_for_status()  # fmt: skip
    requests.post(f"{server.url}/v1/completions", json={**body, "prompt": "Hello"}, timeout=300).raise_for_status()


def run_variant(args, name: str, extra: list[str], port: int, work: Path, code: Path) -> dict:
    server = start_server(args, port, extra, work / f"server-{name}.log", code)
    try:
        started = time.time()
        server.wait_ready()
        startup_s = time.time() - started
        warm_up(server, args)
        log_tail = server.log()
        threshold = re.findall(r"long_prefill_token_threshold=(\d+)", log_tail)
        budget = re.findall(r"with a (\d+)-token prefill chunk in flight", log_tail)  # lminf's KV bound line
        long_argv = bench_argv(args, server.url, work, f"long-{name}", args.long_input, 0.0, args.long_output, 1,
                               None, seed=1)  # fmt: skip
        short_argv = bench_argv(args, server.url, work, f"short-{name}", args.short_input, args.short_range_ratio,
                                args.short_output, args.short_prompts, args.short_rate, seed=2)  # fmt: skip
        load_before = os.getloadavg()[0]
        # Both clients start together (each takes seconds to import vLLM and make its prompts), the long one a
        # moment first; the short requests then arrive, at the given rate, while the long prompt prefills.
        long_client = subprocess.Popen(long_argv, stdout=open(work / f"long-{name}.log", "w"), stderr=subprocess.STDOUT)
        time.sleep(args.short_delay)
        short = subprocess.run(short_argv, stdout=open(work / f"short-{name}.log", "w"), stderr=subprocess.STDOUT,
                               timeout=1800)  # fmt: skip
        long_rc = long_client.wait(timeout=1800)
        for rc, client in ((short.returncode, "short"), (long_rc, "long")):
            if rc:
                raise RuntimeError(f"{client} client exited {rc}:\n{(work / f'{client}-{name}.log').read_text()[-3000:]}")
        load_after = os.getloadavg()[0]
    finally:
        server.stop()
    return summarize(name, extra, server, long_argv, short_argv, work, startup_s, threshold, budget, load_before,
                     load_after)  # fmt: skip


def summarize(name, extra, server, long_argv, short_argv, work, startup_s, threshold, budget, load_before, load_after):
    long = json.loads((work / f"long-{name}.json").read_text())
    short = json.loads((work / f"short-{name}.json").read_text())
    long_start, long_ttft = long["start_times"][0], long["ttfts"][0]
    prefill_end = long_start + long_ttft
    during = [t for s, t in zip(short["start_times"], short["ttfts"]) if long_start <= s < prefill_end]
    during_ms = sorted(1000 * t for t in during)
    return {
        "name": name,
        "server_extra_args": extra,
        # the value the engine ran with: the variant's own, else lminf's default from the server's log line
        "long_prefill_token_threshold": int(extra[extra.index("--long-prefill-token-threshold") + 1])
        if "--long-prefill-token-threshold" in extra else int(threshold[-1]) if threshold else 0,
        "max_num_batched_tokens": int(budget[-1]) if budget else None,
        "server_command": shown(server.argv, None).replace(f"--port {server.url.rsplit(':', 1)[1]}", "--port PORT"),
        "long_command": shown(long_argv, None).replace(server.url, "http://127.0.0.1:PORT").split(" --result-dir")[0],
        "short_command": shown(short_argv, None).replace(server.url, "http://127.0.0.1:PORT").split(" --result-dir")[0],
        "server_startup_s": round(startup_s, 1),
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
        "long": {
            "input_tokens": long["total_input_tokens"],
            "ttft_ms": round(1000 * long_ttft, 1),
            "e2el_ms": round(long["mean_e2el_ms"], 1),
        },
        "short": {
            "completed": short["completed"],
            "input_tokens_mean": round(short["total_input_tokens"] / max(short["completed"], 1), 1),
            "request_rate": short["request_rate"],
            "mean_ttft_ms": round(short["mean_ttft_ms"], 1),
            "median_ttft_ms": round(short["median_ttft_ms"], 1),
            "p99_ttft_ms": round(short["p99_ttft_ms"], 1),
            "mean_tpot_ms": round(short["mean_tpot_ms"], 1),
            "mean_e2el_ms": round(short["mean_e2el_ms"], 1),
            "sent_during_prefill": len(during_ms),
            "during_prefill_mean_ttft_ms": round(sum(during_ms) / len(during_ms), 1) if during_ms else None,
            "during_prefill_max_ttft_ms": round(during_ms[-1], 1) if during_ms else None,
            "ttfts_ms": [round(1000 * t, 1) for t in short["ttfts"]],
            "sent_after_long_s": [round(s - long_start, 2) for s in short["start_times"]],
        },
    }


def print_table(runs: list[dict]) -> None:
    print(f"\n{'variant':<12} {'cap':>7} {'long TTFT s':>12} {'short TTFT mean':>16} {'median':>8} {'p99':>8} "
          f"{'during prefill n':>17} {'mean':>8} {'max':>8}  (s)")  # fmt: skip
    for r in runs:
        s = r["short"]
        d_mean, d_max = s["during_prefill_mean_ttft_ms"], s["during_prefill_max_ttft_ms"]
        print(f"{r['name']:<12} {r['long_prefill_token_threshold'] or '-':>7} {r['long']['ttft_ms'] / 1000:>12.1f} "
              f"{s['mean_ttft_ms'] / 1000:>16.2f} {s['median_ttft_ms'] / 1000:>8.2f} {s['p99_ttft_ms'] / 1000:>8.2f} "
              f"{s['sent_during_prefill']:>17} {(d_mean or 0) / 1000:>8.2f} {(d_max or 0) / 1000:>8.2f}")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    recorded = {k: str(v) for k, v in vars(args).items()}
    args.model = args.model or str(DEFAULT_MODEL)
    variants = dict(BUILTIN)
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        variants[name] = shlex.split(extra)
        if name not in args.variants:
            args.variants.append(name)
    runs = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    with tempfile.TemporaryDirectory(prefix="mixed-ttft-") as tmp:
        work = Path(tmp)
        code, digest = snapshot_package(work)
        for i, name in enumerate(args.variants):
            print(f"[{name}] vllm serve ... {shlex.join(variants[name])}", flush=True)
            try:
                runs.append(run_variant(args, name, variants[name], args.port + i, work, code))
            except Exception:
                for log in sorted(work.glob("*.log")):
                    print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
                raise
            print_table(runs[-1:])
    report = {
        "args": recorded,
        "model": args.model.replace(str(Path.home()), "~"),
        "cpus": os.cpu_count(),
        "lminf_vllm_sha256": digest,  # of the package copy every server ran
        "git_head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip(),  # fmt: skip
        "runs": runs,
    }
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "cpu": describe()}, indent=1) + "\n")
    print_table(runs)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
