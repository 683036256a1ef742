"""Soak and load test of `vllm serve --attention-backend lminf` on 127.0.0.1.

Starts a real server, then runs rounds of concurrent streaming requests
(completions and chat completions alike), each generating well past the
model's max_position_embeddings; in every round some clients hang up
mid-stream. It checks that every other stream ends with exactly the tokens it
asked for, that the server stays healthy, and that the memory of the server's
process tree stays flat from round to round (KV per sequence is bounded). It
stops by itself after the given rounds.

    python benchmarks/soak.py --help
    python benchmarks/soak.py --rounds 10 --concurrency 32 --tokens 2000   # the long version

Prints, per round: requests, tokens, seconds and peak RSS of the server tree;
exits non-zero if a check failed. The default model is a random tiny Llama
with a 128-position RoPE table; pass --model for another.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).parent))
from kv_memory import page_bytes  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402

CHAT = "chat"
COMPLETION = "completion"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="HF model dir (default: a tiny random Llama, built on the fly)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16, help="streams per round")
    p.add_argument("--tokens", type=int, default=400, help="tokens each stream generates")
    p.add_argument("--disconnect-every", type=int, default=4, help="every k-th client hangs up mid-stream")
    p.add_argument("--max-model-len", type=int, default=100_000)
    p.add_argument("--kv-blocks", type=int, default=256, help="KV pool size in blocks")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--lminf", default='{"global_tokens": 4, "local_tokens": 64}', help="additional_config lminf JSON")
    p.add_argument("--rss-growth", type=float, default=0.10, help="allowed growth of peak RSS after round 1")
    p.add_argument("--out", type=Path, default=Path("out/soak.json"))
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, url: str, log_path: Path, timeout: float = 300) -> None:
    """Until `vllm serve` answers /v1/models; RuntimeError with its log's tail if it dies or stalls."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/v1/models", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


class ServeProcess:
    """A `vllm serve` command line in its own session (stop() takes all it started), importing
    `code`'s lminf_vllm before the installed one (None: the installed one); env: variables to
    set, None to remove. The benchmarks that compare configurations share it."""

    def __init__(self, argv: list[str], port: int, log_path: Path, code: Path | None = None, env=None):
        self.argv, self.url, self.log_path = argv, f"http://127.0.0.1:{port}", log_path
        environ = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        if code is not None:
            environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), environ.get("PYTHONPATH")]))
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        self.proc = subprocess.Popen(argv, env=environ, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip

    def wait_ready(self, timeout: float = 600) -> None:
        wait_ready(self.proc, self.url, self.log_path, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()  # vllm serve stops its engine core and workers
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)  # its own session: only what this process started
            self.proc.wait()


class Server:
    """`vllm serve` with lminf, on a free port of 127.0.0.1."""

    def __init__(self, args, model: Path, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        vllm = Path(sys.executable).with_name("vllm")
        cmd = [
            str(vllm), "serve", str(model), "--attention-backend", "lminf",
            "--additional-config", json.dumps({"lminf": json.loads(args.lminf)}),
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
            "--block-size", str(args.block_size), "--max-model-len", str(args.max_model_len),
            "--kv-cache-memory-bytes", str(args.kv_blocks * page_bytes(model, args.block_size)),
            "--max-num-seqs", str(args.concurrency),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=300):
        wait_ready(self.proc, self.url, self.log_path, timeout)

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=10).ok
        except requests.RequestException:
            return False

    def rss_bytes(self) -> int:
        return tree_rss_bytes(self.proc.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (those that exit meanwhile count 0)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def stream_one(url, model, kind, index, tokens, hang_up_after):
    """One streaming request; returns (generated tokens reported by usage, hung up?)."""
    text = f"def task_{index}(x):\n    return x * {index}\n" * 4
    common = {"model": str(model), "max_tokens": tokens, "temperature": 0.8, "seed": index,
              "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if kind == CHAT:
        body = {**common, "messages": [{"role": "user", "content": text}]}
        path = "/v1/chat/completions"
    else:
        body = {**common, "prompt": text}
        path = "/v1/completions"
    usage, chunks = None, 0
    with requests.post(url + path, json=body, stream=True, timeout=600) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {reply.status_code}: {reply.text[:300]}")
        for line in reply.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            chunks += 1
            if hang_up_after and chunks >= hang_up_after:
                return None, True  # leaving the `with` closes the connection mid-stream
            usage = event.get("usage") or usage
    return (usage or {}).get("completion_tokens"), False


def run_round(server, args, model, round_index):
    jobs = []
    for i in range(args.concurrency):
        kind = CHAT if i % 2 else COMPLETION
        hang_up = 5 if args.disconnect_every and i % args.disconnect_every == args.disconnect_every - 1 else 0
        jobs.append((kind, round_index * 1000 + i, hang_up))
    peak_rss, done = server.rss_bytes(), threading.Event()

    def watch():
        nonlocal peak_rss
        while not done.wait(0.5):
            peak_rss = max(peak_rss, server.rss_bytes())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(stream_one, server.url, model, k, i, args.tokens, h) for k, i, h in jobs]
        results = [f.result() for f in futures]
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    finished = [n for n, hung in results if not hung]
    return {
        "round": round_index + 1,
        "requests": len(jobs),
        "hung_up": sum(hung for _, hung in results),
        "completed": len(finished),
        "complete_with_all_tokens": sum(n == args.tokens for n in finished),
        "tokens": sum(n or 0 for n in finished),
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(peak_rss / 2**20, 1),
        "healthy_after": server.healthy(),
    }


def check(report, args) -> list[str]:
    problems = []
    for r in report["rounds"]:
        if r["complete_with_all_tokens"] != r["completed"]:
            problems.append(f"round {r['round']}: {r['completed'] - r['complete_with_all_tokens']} streams short of {args.tokens} tokens")
        if not r["healthy_after"]:
            problems.append(f"round {r['round']}: /health failed after the round")
    first = report["rounds"][0]["peak_rss_mib"]
    last = max(r["peak_rss_mib"] for r in report["rounds"][1:]) if len(report["rounds"]) > 1 else first
    if last > first * (1 + args.rss_growth):
        problems.append(f"peak RSS grew from {first} MiB (round 1) to {last} MiB")
    return problems


def run(args) -> dict:
    from lminf_vllm.testing.tiny_models import build_llama

    model = args.model
    if model is None:
        model = Path(os.environ.get("LMINF_CACHE", Path.home() / ".cache" / "lminf-vllm")) / "soak-tiny-llama"
        if not (model / "model.safetensors").exists():
            build_llama(model, max_position_embeddings=128)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = Server(args, model, args.out.with_suffix(".server.log"))
    report = {"model": str(model), "tokens_per_stream": args.tokens, "rounds": []}
    try:
        server.wait_ready()
        print("| round | requests | hung up | completed | with all tokens | tokens | s | peak RSS MiB | healthy |")
        print("|---|---|---|---|---|---|---|---|---|")
        for i in range(args.rounds):
            r = run_round(server, args, model, i)
            report["rounds"].append(r)
            print(f"| {r['round']} | {r['requests']} | {r['hung_up']} | {r['completed']} | {r['complete_with_all_tokens']} | "
                  f"{r['tokens']} | {r['seconds']} | {r['peak_rss_mib']} | {r['healthy_after']} |", flush=True)  # fmt: skip
    finally:
        server.stop()
    report["problems"] = check(report, args)
    report["total_requests"] = sum(r["requests"] for r in report["rounds"])
    report["total_tokens"] = sum(r["tokens"] for r in report["rounds"])
    report["total_seconds"] = round(sum(r["seconds"] for r in report["rounds"]), 1)
    args.out.write_text(json.dumps({**report, "cpu": describe()}, indent=2))
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(f"\n{report['total_requests']} requests, {report['total_tokens']} tokens in {report['total_seconds']} s; "
          f"report in {args.out}")  # fmt: skip
    for problem in report["problems"]:
        print("FAIL:", problem)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
