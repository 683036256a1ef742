"""Passkey retrieval (the paper's Table 2 task) through the real engine, stock vs lminf.

A 5-digit key is hidden at a random depth of repetitive filler text, and the
prompt ends by asking for it; greedy generation must repeat the key. With
LM-Infinite a key is only readable while it lies inside the last W tokens (or
the first G): past that, the Λ-mask has dropped it by design, so accuracy at
length n is roughly the share of depths within W of the end. Stock attention
sees everything but fails once n passes the training length.

    python benchmarks/passkey.py --help
    python benchmarks/passkey.py --lengths 2048 4096 8192 16384 --trials 4
"""

import argparse
import json
import os
import platform
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import engine_options, resolve_model, training_length  # noqa: E402

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


def run_mode(model: Path, mode: str, cases: list[dict], **engine_kw) -> list[str]:
    from vllm import LLM, SamplingParams

    longest = max(len(c["prompt"]) for c in cases)
    llm = LLM(**engine_options(model, mode, longest + 16, **engine_kw))
    try:
        outs = llm.generate(
            [{"prompt_token_ids": c["prompt"]} for c in cases],
            SamplingParams(max_tokens=8, temperature=0.0),
            use_tqdm=False,
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return [o.outputs[0].text for o in outs]


def main(argv=None):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (SmolLM2-135M-Instruct) or an HF directory")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--trials", type=int, default=4, help="needle depths per length, spread evenly")
    p.add_argument("--modes", nargs="+", choices=("stock", "lminf"), default=["stock", "lminf"])
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--local-tokens", type=int, help="W (default: the training length)")
    p.add_argument("--distance-cap", type=int, help="C (default: the training length)")
    p.add_argument("--kv-cache-gib", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/passkey.json"))
    args = p.parse_args(argv)

    from tqdm import tqdm
    from transformers import AutoTokenizer

    model = resolve_model(args.model)
    L = training_length(model)
    tok = AutoTokenizer.from_pretrained(model)
    engine_kw = dict(global_tokens=args.global_tokens, local_tokens=args.local_tokens or L,
                     distance_cap=args.distance_cap or L, kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)))  # fmt: skip
    cases = {n: trials(tok, n, args.trials, args.seed) for n in args.lengths}
    results = {}
    jobs = [(mode, n) for mode in args.modes for n in args.lengths]
    for mode, n in tqdm(jobs, desc="passkey", file=sys.stderr):
        answers = run_mode(model, mode, cases[n], **engine_kw)
        hits = [str(c["key"]) in a for c, a in zip(cases[n], answers)]
        results.setdefault(mode, {})[n] = {
            "accuracy": sum(hits) / len(hits),
            "trials": [{"depth": c["depth"], "key": c["key"], "answer": a, "hit": h}
                       for c, a, h in zip(cases[n], answers, hits)],  # fmt: skip
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model": model.name, "training_length": L, "lminf": {k: v for k, v in engine_kw.items() if k != "kv_cache_bytes"},
           "corpus": CORPUS,
           "command": "python benchmarks/passkey.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "results": results}  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{model.name} (training length {L}), passkey accuracy over {args.trials} depths; lminf {doc['lminf']}")
    print("| mode | " + " | ".join(str(n) for n in args.lengths) + " |")
    print("|---" * (len(args.lengths) + 1) + "|")
    for mode, by_n in results.items():
        print(f"| {mode} | " + " | ".join(f"{by_n[n]['accuracy']:.0%}" for n in args.lengths) + " |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
