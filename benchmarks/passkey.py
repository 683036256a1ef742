"""Passkey retrieval (the paper's Table 2 task) through the real engine, stock vs lminf (vs top-k).

A 5-digit key is hidden at a random depth of repetitive filler text, and the
prompt ends by asking for it; greedy generation must repeat the key. With
LM-Infinite a key is only readable while it lies inside the last W tokens (or
the first G): past that, the Λ-mask has dropped it by design, so accuracy at
length n is roughly the share of depths within W of the end. Stock attention
sees everything but fails once n passes the training length.

Mode "topk" is lminf plus the k best middle blocks per (sequence, layer, KV
head) read back from the host store (--topk-blocks k; docs/topk-contract.md).
For every mode the JSON records the device KV blocks per sequence, measured
from the engine: the most non-null blocks one request held in the KV pool
after a scheduler step (decode steps and prefill chunks apart), against the
contract's bound ceil(G/B) + ceil(W/B) + 1 (decode; a prefill chunk of T tokens
adds ceil((W - 1 + T)/B) - ceil(W/B)), the same with top-k: its middle blocks
are read from the host store. Results made before that counted k more blocks,
a selection buffer (docs/topk-contract.md), in their bound.

    python benchmarks/passkey.py --help
    python benchmarks/passkey.py --lengths 2048 4096 8192 16384 --trials 4
    python benchmarks/passkey.py --lengths 16384 32768 --trials 3 --modes lminf topk \\
        --local-tokens 2048 --distance-cap 2048 --block-size 64 --topk-blocks 4
"""

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import engine_options, resolve_model, training_length  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"
# The text is the constants above (the paper's synthetic filler), not a corpus
# file, so the prompts are pinned by this source; results name it.
CORPUS = "passkey filler: INTRO, FILLER, NEEDLE, QUESTION in benchmarks/passkey.py"


def build_prompt(tok, n_tokens: int, depth: float, key: int) -> list[int]:
    """About n_tokens tokens with the needle after `depth` of the filler (0 = start, 1 = end)."""
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, filler, needle, question = enc(INTRO), enc(FILLER), enc(NEEDLE.format(key=key)), enc(QUESTION)
    fillers = max(0, (n_tokens - len(intro) - len(needle) - len(question)) // len(filler))
    before = round(depth * fillers)
    return intro + filler * before + needle + filler * (fillers - before) + question


def trials(tok, n_tokens: int, count: int, seed: int) -> list[dict]:
    """Depths spread evenly over (0, 1), keys random: the same set for every mode."""
    rng = random.Random(seed * 1_000_003 + n_tokens)
    out = []
    for t in range(count):
        depth, key = (t + 0.5) / count, rng.randint(10000, 99999)
        out.append({"depth": round(depth, 3), "key": key, "prompt": build_prompt(tok, n_tokens, depth, key)})
    return out


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def mode_options(model: Path, mode: str, max_model_len: int, *, block_size: int, topk_blocks: int,
                 topk_score: str | None = None, dtype: str = "float32", **engine_kw) -> dict:  # fmt: skip
    """vllm.LLM(...) arguments: quality.engine_options, with our block size and dtype; "topk" is
    lminf with topk_blocks (and topk_score, when given) added to its additional_config."""
    options = engine_options(model, "lminf" if mode == "topk" else mode, max_model_len, **engine_kw)
    options["block_size"] = block_size
    options["dtype"] = dtype
    if mode == "topk":
        cfg = dict(options["additional_config"]["lminf"], topk_blocks=topk_blocks)
        if topk_score is not None:
            cfg["topk_score"] = topk_score
        options["additional_config"] = {**options["additional_config"], "lminf": cfg}
    return options


class KvProbe:
    """Device KV blocks per sequence, measured from an in-process engine.

    Pool: after every scheduler step (allocation for the step done, the Λ
    policy's frees applied), the non-null blocks each scheduled request holds
    in the KV pool's managers (one per KV cache group), kept as the maximum per
    request and phase (prefill chunk / decode step), with the largest chunk.
    (topk_buffer stays 0: results from before top-k's selection buffer moved into
    the pool counted it apart; since then there is none.)
    """

    def __init__(self, llm):
        core = llm.llm_engine.engine_core
        if not hasattr(core, "engine_core"):
            raise SystemExit("passkey.py measures KV blocks in-process: run with VLLM_ENABLE_V1_MULTIPROCESSING=0")
        self.scheduler = core.engine_core.scheduler
        self.managers = list(self.scheduler.kv_cache_manager.coordinator.single_type_managers)
        self.pool: dict[str, dict[str, int]] = {}  # request id -> phase -> most blocks held
        self.chunk: dict[str, int] = {}  # request id -> largest prefill chunk scheduled
        schedule = self.scheduler.schedule

        def probed(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self.sample(out)
            return out

        self.scheduler.schedule = probed

    def sample(self, out) -> None:
        for rid, t in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            start = req.num_computed_tokens - t  # schedule() has advanced it past this step's tokens
            phase = "decode" if start >= req.num_prompt_tokens else "prefill"
            held = sum(not b.is_null for m in self.managers for b in m.req_to_blocks.get(rid, ()))
            most = self.pool.setdefault(rid, {})
            most[phase] = max(most.get(phase, 0), held)
            if phase == "prefill":
                self.chunk[rid] = max(self.chunk.get(rid, 0), t)
                print(f"    prefill chunk to {req.num_computed_tokens}/{req.num_prompt_tokens} scheduled at "
                      f"{time.strftime('%H:%M:%S')}, {held} pool blocks", file=sys.stderr, flush=True)  # fmt: skip

    def reset(self) -> None:
        self.pool.clear(), self.chunk.clear()

    def most(self) -> dict:
        """Over the requests since reset() (one generate() call of one prompt: the engine
        core's request ids are not the ones generate() returns)."""
        pools = list(self.pool.values())
        return {"pool_prefill": max((x.get("prefill", 0) for x in pools), default=0),
                "pool_decode": max((x.get("decode", 0) for x in pools), default=0),
                "largest_chunk": max(self.chunk.values(), default=0),
                "topk_buffer": 0}  # fmt: skip


def run_mode(model: Path, mode: str, cases: list[dict], **engine_kw) -> list[dict]:
    """One engine; the cases one at a time (each prefills alone, in chunks of the
    step budget): per case its answer, wall time and device KV blocks."""
    from vllm import LLM, SamplingParams

    longest = max(len(c["prompt"]) for c in cases)
    llm = LLM(**mode_options(model, mode, longest + 16, **engine_kw))
    probe = KvProbe(llm)
    out = []
    try:
        for c in cases:
            probe.reset()
            t0 = time.perf_counter()
            (o,) = llm.generate([{"prompt_token_ids": c["prompt"]}], SamplingParams(max_tokens=8, temperature=0.0),
                                use_tqdm=False)  # fmt: skip
            wall = time.perf_counter() - t0
            out.append({"answer": o.outputs[0].text, "wall_s": round(wall, 1), "kv": probe.most()})
            print(f"  {mode} {len(c['prompt'])} tokens, depth {c['depth']}: {o.outputs[0].text!r} in {wall:.0f} s, "
                  f"{out[-1]['kv']}", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return out


def device_blocks(trials: list[dict], *, global_tokens: int, local_tokens: int, block_size: int) -> dict:
    """The most device KV blocks one sequence held, against the contract's bound."""
    G, W, B = global_tokens, local_tokens, block_size
    kv = [t["kv"] for t in trials]
    pool_decode, pool_prefill = max(x["pool_decode"] for x in kv), max(x["pool_prefill"] for x in kv)
    buffer, chunk = max(x["topk_buffer"] for x in kv), max(x["largest_chunk"] for x in kv)
    return {
        "pool_decode": pool_decode, "pool_prefill": pool_prefill, "topk_buffer": buffer, "largest_chunk": chunk,
        "device_decode": pool_decode + buffer, "device_prefill": pool_prefill + buffer,
        "bound_decode": cdiv(G, B) + cdiv(W, B) + 1,
        "bound_prefill": cdiv(G, B) + cdiv(W - 1 + chunk, B) + 1,
    }  # fmt: skip


def main(argv=None):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (SmolLM2-135M-Instruct) or an HF directory")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--trials", type=int, default=4, help="needle depths per length, spread evenly")
    p.add_argument("--modes", nargs="+", choices=("stock", "lminf", "topk"), default=["stock", "lminf"],
                   help="topk: lminf with --topk-blocks selected middle blocks")
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--local-tokens", type=int, help="W (default: the training length)")
    p.add_argument("--distance-cap", type=int, help="C (default: the training length)")
    p.add_argument("--block-size", type=int, default=32, help="KV block size B (every mode)")
    p.add_argument("--topk-blocks", type=int, default=0, help="k, middle blocks read again in mode topk")
    p.add_argument("--topk-score", choices=("mass", "bound", "mass_int8"), help="topk_score in mode topk (default: the engine's)")
    p.add_argument("--dtype", default="float32", help="the engines' dtype")
    p.add_argument("--kv-cache-gib", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/passkey.json"))
    args = p.parse_args(argv)
    if "topk" in args.modes and args.topk_blocks < 1:
        p.error("mode topk needs --topk-blocks >= 1")

    from tqdm import tqdm
    from transformers import AutoTokenizer

    model = resolve_model(args.model)
    L = training_length(model)
    tok = AutoTokenizer.from_pretrained(model)
    engine_kw = dict(global_tokens=args.global_tokens, local_tokens=args.local_tokens or L,
                     distance_cap=args.distance_cap or L, kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)))  # fmt: skip
    cases = {n: trials(tok, n, args.trials, args.seed) for n in args.lengths}
    results = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in engine_kw.items() if k != "kv_cache_bytes"}
    settings.update(block_size=args.block_size, topk_blocks=args.topk_blocks, dtype=args.dtype)
    if args.topk_score is not None:
        settings["topk_score"] = args.topk_score
    doc = {"model": model.name, "training_length": L, "lminf": settings,
           "corpus": CORPUS,
           "command": "python benchmarks/passkey.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "results": results}  # fmt: skip
    jobs = [(mode, n) for mode in args.modes for n in args.lengths]
    for mode, n in tqdm(jobs, desc="passkey", file=sys.stderr):
        k = args.topk_blocks if mode == "topk" else 0
        runs = run_mode(model, mode, cases[n], block_size=args.block_size, topk_blocks=k, topk_score=args.topk_score,
                        dtype=args.dtype, **engine_kw)  # fmt: skip
        hits = [str(c["key"]) in r["answer"] for c, r in zip(cases[n], runs)]
        rows = [{"depth": c["depth"], "key": c["key"], "prompt_tokens": len(c["prompt"]), "answer": r["answer"],
                 "hit": h, "wall_s": r["wall_s"], "kv": r["kv"]}
                for c, r, h in zip(cases[n], runs, hits)]  # fmt: skip
        results.setdefault(mode, {})[n] = {
            "accuracy": sum(hits) / len(hits),
            "device_kv_blocks": device_blocks(rows, global_tokens=args.global_tokens, local_tokens=engine_kw["local_tokens"],
                                              block_size=args.block_size),  # fmt: skip
            "trials": rows,
        }
        # After every (mode, length): a long run keeps what it did.
        args.out.write_text(json.dumps({**doc, "cpu": describe()}, indent=2) + "\n")
    print(f"\n{model.name} (training length {L}), passkey accuracy over {args.trials} depths; lminf {doc['lminf']}")
    print("| mode | " + " | ".join(str(n) for n in args.lengths) + " |")
    print("|---" * (len(args.lengths) + 1) + "|")
    for mode, by_n in results.items():
        print(f"| {mode} | " + " | ".join(f"{by_n[n]['accuracy']:.0%}" for n in args.lengths) + " |")
    print("\ndevice KV blocks per sequence (decode: device / bound; prefill likewise)")
    for mode, by_n in results.items():
        for n in args.lengths:
            d = by_n[n]["device_kv_blocks"]
            print(f"  {mode} {n}: decode {d['device_decode']} / {d['bound_decode']}; "
                  f"prefill {d['device_prefill']} / {d['bound_prefill']}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
