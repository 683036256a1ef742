"""Feasibility of docs/topk-contract.md before any engine work: does top-k retrieve the passkey?

SmolLM2-135M-Instruct run densely (lminf_vllm.testing.reference.DenseLlama, float32)
with the contract's attention (topk_reference.blockwise_topk_attention, held to the
float64 dense reference by tests/test_topk_reference.py), on passkey prompts built by
benchmarks/passkey.py. Λ alone (topk = 0) against top-k, for each selection rule.

Greedy decoding is checked by teacher forcing: the prompt is followed by the answer
" <key>" minus its last token, the prompt is split into prefill chunks and every
answer token is its own chunk (a decode step, as the engine would run it); a trial
is a hit iff the argmax at each answer position is the answer's token, i.e. iff
greedy decoding would write " <key>" (stricter than passkey.py, which looks for the
digits anywhere in 8 tokens).

    python benchmarks/topk_reference_passkey.py --help
"""

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from passkey import CORPUS, NEEDLE, trials  # noqa: E402

from lminf_vllm.config import LminfConfig  # noqa: E402
from lminf_vllm.testing.reference import DenseLlama  # noqa: E402
from lminf_vllm.testing.topk_reference import blockwise_topk_attention, chunk_spans  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402

RULES = ("max/last", "sum/last", "max/max", "sum/max")  # group reduce / chunk rule


def needle_blocks(prompt: list[int], needle: list[int], B: int) -> list[int]:
    """Blocks holding the needle's digits (the tokens of the key, both copies)."""
    for s in range(len(prompt) - len(needle) + 1):
        if prompt[s : s + len(needle)] == needle:
            return sorted({p // B for p in range(s, s + len(needle))})
    raise ValueError("needle not found in prompt")


def run_case(model, tok, case, cfg, topk, B, prefill_chunk, rule):
    answer = tok(f" {case['key']}", add_special_tokens=False)["input_ids"]
    prompt = case["prompt"]
    ids = prompt + answer[:-1]
    chunks = [e - s for s, e in chunk_spans(len(prompt), prefill_chunk)] + [1] * (len(answer) - 1)
    seen = []  # per layer: share of (KV head, answer step) whose selection holds a needle block
    nb = set(needle_blocks(prompt, tok(NEEDLE.format(key=case["key"]), add_special_tokens=False)["input_ids"], B))

    def record(selection):
        steps = [sel for s, e, sel in selection if e > len(prompt) - 1]  # the chunks whose rows predict the answer
        hits = [bool(nb & set(blocks)) for sel in steps for blocks in sel]
        seen.append(sum(hits) / max(1, len(hits)))

    group, reduce_ = rule.split("/") if topk else ("max", "last")
    attn = functools.partial(blockwise_topk_attention, topk=topk, block_size=B, chunks=chunks,
                             group_reduce=group, chunk_rule=reduce_, on_selection=record,
                             score="bound")  # fmt: skip  # (its results predate the mass score)
    logits = model.logits(ids, cfg, attention=attn)
    pred = logits[len(prompt) - 1 :].argmax(-1).tolist()
    return {
        "depth": case["depth"], "key": case["key"], "answer": tok.decode(pred), "hit": pred == answer,
        "needle_from_end": len(prompt) - max(nb) * B, "needle_selected_share": round(sum(seen) / len(seen), 3) if topk else None,
    }  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (about)")
    p.add_argument("--trials", type=int, default=3, help="depths, spread evenly (3: 1/6, 1/2, 5/6)")
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--local-tokens", type=int, default=1024)
    p.add_argument("--distance-cap", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt rows per prefill chunk")
    p.add_argument("--rules", nargs="+", choices=RULES, default=["max/last"])
    p.add_argument("--no-lambda", action="store_true", help="skip the topk = 0 baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/topk-reference-passkey.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from lminf_vllm.prepare_model import DEFAULT_OUT, prepare

    model_dir = DEFAULT_OUT if (DEFAULT_OUT / "config.json").exists() else prepare(DEFAULT_OUT)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = DenseLlama(model_dir, dtype=torch.float32)
    cfg = LminfConfig(args.global_tokens, args.local_tokens, args.distance_cap)
    cases = trials(tok, args.length, args.trials, args.seed)
    modes = ([] if args.no_lambda else [("lambda", 0, None)]) + [(f"topk{args.topk} {r}", args.topk, r) for r in args.rules]
    setting = {"global_tokens": cfg.global_tokens, "local_tokens": cfg.local_tokens, "distance_cap": cfg.distance_cap,
               "block_size": args.block_size, "topk": args.topk, "prefill_chunk": args.prefill_chunk,
               "prompt_tokens": [len(c["prompt"]) for c in cases]}  # fmt: skip
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    doc.update({"model": model_dir.name, "corpus": CORPUS, "dtype": "float32",
                "hit": "teacher-forced greedy: argmax equals ' <key>' at every answer token",
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"})  # fmt: skip
    results = {}
    for name, k, rule in modes:
        t0 = time.time()
        rows = [run_case(model, tok, c, cfg, k, args.block_size, args.prefill_chunk, rule) for c in cases]
        results[name] = {"accuracy": sum(r["hit"] for r in rows) / len(rows), "seconds": round(time.time() - t0), "trials": rows}
        print(f"{name}: {results[name]['accuracy']:.0%} " + " ".join(f"[{r['depth']}: {r['answer']!r} sel {r['needle_selected_share']}]" for r in rows), flush=True)
    command = "python benchmarks/topk_reference_passkey.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc["runs"] = [r for r in doc["runs"] if r["setting"] != setting or r["command"] != command]
    doc["runs"].append({"setting": setting, "command": command, "results": results})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**doc, "cpu": describe()}, indent=2) + "\n")
    depths = [c["depth"] for c in cases]
    print(f"\n{model_dir.name}, ~{args.length} tokens, {setting}")
    print("| mode | accuracy | " + " | ".join(f"depth {d}" for d in depths) + " |")
    print("|---" * (len(depths) + 2) + "|")
    for name, r in results.items():
        cells = " | ".join(("hit" if t["hit"] else "miss") + ("" if t["needle_selected_share"] is None else f" (sel {t['needle_selected_share']:.0%})") for t in r["trials"])
        print(f"| {name} | {r['accuracy']:.0%} | {cells} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
