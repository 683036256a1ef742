r"""Which dtype, block size and compile setting `make serve` should default to on this CPU.

One engine per configuration, each as `make serve` starts it (SmolLM2-135M-Instruct,
lminf G=10, `max_model_len` 131072, vLLM's serving step of 2048 tokens, prefix
caching on) except for the setting under test. Each times --prompts prefills of
--tokens tokens of real text (the pinned held-out corpus, a different stretch per
prompt so no prefix is reused) after one untimed short warm-up; the fastest
counts. `auto` is what the user gets by default; the JSON records what it resolved
to and the CPU (lminf_vllm/cpu_isa.describe).

    python benchmarks/cpu_dtype.py --out benchmarks/results/cpu-dtype.json
    # An AVX2-only CPU, approximately, on an AVX-512 one: torch and oneDNN capped to AVX2
    # (vLLM's own CPU attention kernels keep the instructions they were loaded for).
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_dtype.py \
        --configs auto:128:compile float32:128:compile bfloat16:128:compile \
        --out benchmarks/results/cpu-dtype-avx2-capped.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from kv_memory import in_process_engine_env  # noqa: E402

MODEL = Path.home() / ".cache/lminf-vllm/SmolLM2-135M-Instruct"
DEFAULT_CONFIGS = ["auto:128:compile", "float32:128:compile", "bfloat16:128:compile", "auto:32:compile",
                   "auto:128:eager"]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="dtype:block_size:compile|eager")
    p.add_argument("--tokens", type=int, default=4096, help="prompt tokens per timed prefill")
    p.add_argument("--prompts", type=int, default=2, help="timed prefills per configuration; the fastest counts")
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--step-tokens", type=int, default=2048, help="max_num_batched_tokens (vllm serve's CPU default)")
    p.add_argument("--out", type=Path, default=Path("out/cpu-dtype.json"))
    return p.parse_args(argv)


def real_text_prompts(tokenizer, count: int, tokens: int) -> list[list[int]]:
    """`count` disjoint stretches of `tokens` tokens of the pinned held-out text."""
    from corpus import pinned_documents

    ids = tokenizer("\n\n".join(text for _, text in pinned_documents()))["input_ids"]
    assert len(ids) >= (count + 1) * tokens, f"the pinned corpus has {len(ids)} tokens"
    return [ids[(i + 1) * tokens : (i + 2) * tokens] for i in range(count)]


def measure(args, config: str) -> dict:
    from vllm import LLM, SamplingParams

    dtype, block_size, mode = config.split(":")
    llm = LLM(
        model=str(args.model), dtype=dtype, block_size=int(block_size), enforce_eager=mode == "eager", seed=0,
        attention_backend="lminf", additional_config={"lminf": {"global_tokens": args.global_tokens}},
        max_model_len=args.max_model_len, max_num_batched_tokens=args.step_tokens, max_num_seqs=4,
        kv_cache_memory_bytes=1 << 30, disable_log_stats=False,
    )  # fmt: skip
    resolved = str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
    prompts = real_text_prompts(llm.get_tokenizer(), args.prompts + 1, args.tokens)
    once = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([{"prompt_token_ids": prompts[0][:256]}], once, use_tqdm=False)  # warm-up, untimed
    times = []
    for prompt in prompts[1:]:
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], once, use_tqdm=False)
        times.append(time.perf_counter() - start)
    llm.llm_engine.engine_core.shutdown()
    del llm
    return {"config": config, "dtype": dtype, "resolved_dtype": resolved, "block_size": int(block_size),
            "compile": mode == "compile", "prefill_s": [round(t, 2) for t in times],
            "prefill_tok_s": round(args.tokens / min(times), 1)}  # fmt: skip


def main(argv=None):
    in_process_engine_env()
    args = parse_args(argv)
    import lminf_vllm
    from lminf_vllm.cpu_isa import describe

    lminf_vllm.register()
    rows = []
    for config in args.configs:
        rows.append(measure(args, config))
        print(json.dumps(rows[-1]), flush=True)
    by_dtype = {r["dtype"]: r["prefill_tok_s"] for r in rows if r["block_size"] == 128 and r["compile"]}
    best = max(by_dtype.get("float32", 0), by_dtype.get("bfloat16", 0))
    summary = {"auto_resolved_to": next((r["resolved_dtype"] for r in rows if r["dtype"] == "auto"), None),
               "auto_over_best_of_float32_bfloat16": round(by_dtype["auto"] / best, 3) if "auto" in by_dtype and best
               else None}  # fmt: skip
    caps = "".join(f"{k}={v} " for k, v in describe().get("isa_capped_by", {}).items())  # a stand-in for another CPU
    command = caps + "python benchmarks/cpu_dtype.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command,
              "cpu": describe(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, **summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| config | resolved dtype | prefill tok/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['resolved_dtype']} | {r['prefill_tok_s']} |")
    print(f"auto -> {summary['auto_resolved_to']}: {summary['auto_over_best_of_float32_bfloat16']}x the faster "
          f"of float32 and bfloat16\nwrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
