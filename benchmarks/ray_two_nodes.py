"""Two Ray nodes on one machine, one lminf engine with TP=2 spread across them.

The multi-node case in miniature: a head node and a worker node, each started
with `ray start` on this machine with one CPU (and a temp dir of its own), then one
engine with `distributed_executor_backend="ray"` and tensor_parallel_size=2, so
Ray must place one rank on each node. Its greedy tokens, past the model's RoPE
table, are compared with TP=1 without Ray; each worker reports from its own
process the Ray node it runs on and the attention its layers use. Both nodes
are stopped at the end whatever happens (by the processes this script started,
never `ray stop`, which would stop every Ray on the machine).

    python benchmarks/ray_two_nodes.py                 # a tiny random Llama (RoPE table of 128)
    python benchmarks/ray_two_nodes.py --model DIR     # any local model lminf serves

Writes benchmarks/results/ray-two-nodes.json.
"""

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from lminf_vllm.cpu_isa import describe

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
G, W, C = 4, 64, 96


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"no {text!r} from ray start in {timeout}s:\n{log.read_text()[-2000:]}")


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    # --block keeps `ray start` in the foreground: stopping it stops the node's processes
    cmd = [str(RAY), "start", "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
           "--object-store-memory", str(80 << 20), "--disable-usage-stats", *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of this node still alive (its own group)
    except ProcessLookupError:
        pass


def wait_for_nodes(n: int, timeout: float = 120) -> list[dict]:
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [node for node in ray.nodes() if node["Alive"]]
        if len(alive) >= n:
            return alive
        time.sleep(1)
    raise RuntimeError(f"{n} Ray nodes did not come up in {timeout}s")


def generate(model: str, prompt: list[int], max_tokens: int, tp: int):
    from vllm import LLM, SamplingParams

    from lminf_vllm.testing.workers import report

    options = dict(model=model, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
                   attention_backend="lminf", block_size=32, max_model_len=1 << 16, seed=0,
                   tensor_parallel_size=tp, additional_config={"lminf": {"global_tokens": G, "local_tokens": W,
                                                                         "distance_cap": C}})  # fmt: skip
    if tp > 1:
        options["distributed_executor_backend"] = "ray"
    llm = LLM(**options)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        executor = type(llm.llm_engine.engine_core.engine_core.model_executor).__name__
        return list(out.outputs[0].token_ids), llm.collective_rpc(report), executor
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model directory (default: a tiny random Llama built here)")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/ray-two-nodes.json"))
    args = parser.parse_args()

    # In-process engine core; Ray workers bind no threads of their own.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    work = Path(tempfile.mkdtemp(prefix="lminf-ray-two-nodes-"))
    # Ray 2.60 turns token authentication on for a new cluster when it finds a token: give this
    # cluster its own, the same for both nodes, their workers and this driver (set before Ray
    # is imported: it reads the mode once per process).
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(work / "ray-token")
    (work / "ray-token").write_text(secrets.token_hex(32))
    model = args.model
    table = None
    if model is None:
        from lminf_vllm.testing.tiny_models import build_llama

        table = 128
        model = str(build_llama(work / "tiny-llama", max_position_embeddings=table))
    prompt = [(7 * i) % 250 + 1 for i in range(args.prompt_tokens)]

    started = time.time()
    tokens_tp1, _, _ = generate(model, prompt, args.max_tokens, tp=1)
    print(f"TP=1 (no Ray): {len(tokens_tp1)} tokens in {time.time() - started:.0f}s", flush=True)

    import ray

    port = free_port()
    nodes = []
    try:
        nodes.append(start_node(["--head", "--port", str(port), "--include-dashboard", "false",
                                 "--temp-dir", str(work / "ray-head")], work / "head.log"))  # fmt: skip
        wait_for_line(work / "head.log", "Ray runtime started", nodes[0])
        nodes.append(start_node(["--address", f"127.0.0.1:{port}", "--temp-dir", str(work / "ray-worker")],
                                work / "worker.log"))  # fmt: skip
        ray.init(address=f"127.0.0.1:{port}")
        alive = wait_for_nodes(2)
        head_id = next(n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"])
        names = {n["NodeID"]: "head" if n["NodeID"] == head_id else "worker" for n in alive}
        print("Ray nodes:", ", ".join(f"{names[n['NodeID']]} {n['NodeID'][:12]} CPU={n['Resources'].get('CPU')}"
                                      for n in alive), flush=True)  # fmt: skip
        started = time.time()
        tokens_tp2, reports, executor = generate(model, prompt, args.max_tokens, tp=2)
        seconds_tp2 = time.time() - started
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(nodes):
            stop_node(proc)

    workers = [{"rank": r["rank"], "node": names.get(r["ray_node_id"], "?"), "ray_node_id": r["ray_node_id"],
                "pid": r["pid"], "attention": r["attention_impls"],
                "lminf_patches_applied": all(r["patches_applied"].values()),
                "kv_heads_per_layer": r["kv_heads_per_layer"]} for r in sorted(reports, key=lambda r: r["rank"])]  # fmt: skip
    for w in workers:
        print(f"rank {w['rank']}: node={w['node']} ({w['ray_node_id'][:12]}) pid={w['pid']} "
              f"attention={','.join(w['attention'])} patches={w['lminf_patches_applied']} "
              f"kv_heads={w['kv_heads_per_layer']}")  # fmt: skip
    print("TP=1 tokens:         ", tokens_tp1)
    print("TP=2 two-node tokens:", tokens_tp2)
    equal = tokens_tp2 == tokens_tp1
    spread = sorted(w["node"] for w in workers) == ["head", "worker"]
    print(f"executor={executor} spread over both nodes: {spread}; tokens equal: {equal}")

    import ray as ray_module
    import vllm

    result = {
        "what": "one lminf engine, TP=2 under vLLM's Ray executor, one rank on each of two Ray nodes "
        "(head and worker started with `ray start` on one machine, 1 CPU each), against TP=1 without Ray",
        "model": "tiny random Llama (2 layers, 4 heads / 2 KV heads, RoPE table 128)" if table else model,
        "lminf": {"global_tokens": G, "local_tokens": W, "distance_cap": C},
        "prompt_tokens": len(prompt),
        "rope_table": table,
        "max_tokens": args.max_tokens,
        "executor": executor,
        "workers": workers,
        "spread_over_both_nodes": spread,
        "tokens_tp1": tokens_tp1,
        "tokens_tp2_two_nodes": tokens_tp2,
        "tokens_equal": equal,
        "tp2_seconds_with_start_up": round(seconds_tp2, 1),
        "versions": {"vllm": vllm.__version__, "ray": ray_module.__version__},
        "command": "python benchmarks/ray_two_nodes.py",
    }
    Path(args.out).write_text(json.dumps({**result, "cpu": describe()}, indent=1) + "\n")
    print("wrote", args.out)
    return 0 if equal and spread else 1


if __name__ == "__main__":
    sys.exit(main())
