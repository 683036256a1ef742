r"""Where a saturated engine's time goes: a saturation preset's engine, offline, under cProfile.

benchmarks/saturation.py measures throughput over HTTP; this runs the same
engine settings (model, dtype, block size, KV budget, lminf config) in one
process (vllm.LLM, VLLM_ENABLE_V1_MULTIPROCESSING=0) on the same kind of load
(--prompts random prompts of --input-len tokens, --output-len tokens each, all
at once, with vLLM's `vllm serve` step budget of 2,048 tokens) and splits the
run's time among the few calls that dominate it: the linear layers (oneDNN
matmuls), vLLM's CPU attention kernel (for prefill chunks past the window and
for the rest), its cache writer, and the lminf host work around them. cProfile
slows Python-heavy code more than the C++ calls, so the host-work shares are
upper bounds; the wall time without the profiler is measured first.

    python benchmarks/step_profile.py --preset small --mode lminf
"""

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from saturation import PRESETS, resolve_model  # noqa: E402

# (label, file suffix, function): tottime of the leaf calls, cumtime of the lminf entry points
LEAVES = [
    ("linear layers (oneDNN matmul)", "~", "<built-in method torch._ops._C.onednn_mm>"),
    ("attention kernel (vLLM's CPU kernel)", "~", "<built-in method torch._ops._C.cpu_attention_with_kv_cache>"),
    ("KV writer (vLLM's CPU cache op)", "~", "<built-in method torch._ops._C.cpu_attn_reshape_and_cache>"),
]
ENTRIES = [
    ("lminf prefill past the window (all of it)", "paths/cpu_kernel/prefill.py", "run_prefills"),
    ("lminf decode and plain rows' kernel calls (all of it)", "paths/cpu_kernel/decode.py", "run_calls"),
    ("lminf step planning", "paths/cpu_kernel/__init__.py", "plan"),
    ("scheduler", "v1/core/sched/scheduler.py", "schedule"),
]
KERNEL_CALLERS = {"prefill": "paths/cpu_kernel/prefill.py", "decode and plain": "paths/cpu_kernel/decode.py"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--mode", choices=["stock", "lminf"], default="lminf")
    p.add_argument("--input-len", type=int, default=6144)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/step-profile-PRESET.json")
    return p.parse_args(argv)


def engine(args, preset):
    from vllm import LLM

    kw = dict(model=str(resolve_model(preset["model"])), dtype=preset["dtype"], seed=0, max_num_seqs=128,
              kv_cache_memory_bytes=preset["kv_mib"] << 20, max_num_batched_tokens=2048,
              enforce_eager=not preset["compile"])  # fmt: skip
    if preset["block_size"]:
        kw["block_size"] = preset["block_size"]
    if args.mode == "stock":
        return LLM(**kw, attention_backend="CPU_ATTN", max_model_len=args.input_len + args.output_len)
    return LLM(**kw, attention_backend="lminf", max_model_len=1 << 20, additional_config={"lminf": preset["lminf"]})


def share(stats: pstats.Stats, suffix: str, name: str, cumulative: bool) -> float:
    total = 0.0
    for (file, _, func), (_, _, tt, ct, _) in stats.stats.items():
        if func == name and (suffix == "~" or file.endswith(suffix)):
            total += ct if cumulative else tt
    return total


def kernel_by_caller(stats: pstats.Stats) -> dict:
    """The kernel's time split by who called cpu_attention_kernel.attend (its one wrapper)."""
    out = dict.fromkeys(KERNEL_CALLERS, 0.0)
    for (file, _, func), (*_, callers) in stats.stats.items():
        if func == "attend" and file.endswith("lminf_vllm/cpu_attention_kernel.py"):
            for (cfile, _, _), (_, _, _, ct) in callers.items():
                for label, suffix in KERNEL_CALLERS.items():
                    out[label] += ct if cfile.endswith(suffix) else 0.0
    return out


def main(argv=None):
    args = parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process: one profile
    import torch
    from vllm import SamplingParams

    preset = PRESETS[args.preset]
    llm = engine(args, preset)
    vocab = llm.get_tokenizer().vocab_size
    g = torch.Generator().manual_seed(0)

    def prompts(n):  # new random ones each time: nothing for the prefix cache to find
        return [{"prompt_token_ids": torch.randint(1, vocab - 1, (args.input_len,), generator=g).tolist()}
                for _ in range(n)]  # fmt: skip

    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts(2), params, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    llm.generate(prompts(args.prompts), params, use_tqdm=False)
    wall = time.perf_counter() - t
    profile = cProfile.Profile()
    t = time.perf_counter()
    profile.runcall(llm.generate, prompts(args.prompts), params, use_tqdm=False)
    profiled = time.perf_counter() - t
    stats = pstats.Stats(profile)
    rows = {label: share(stats, f, n, False) for label, f, n in LEAVES}
    rows |= {label: share(stats, f, n, True) for label, f, n in ENTRIES}
    rows |= {f"attention kernel, called for {k}": v for k, v in kernel_by_caller(stats).items()}
    print(f"{args.preset} {args.mode}: {args.prompts} x {args.input_len} tokens in, {args.output_len} out: "
          f"{wall:.2f} s ({profiled:.2f} s under cProfile)")  # fmt: skip
    for label, s in rows.items():
        print(f"  {label:58s} {s:7.2f} s  {s / profiled:6.1%}")
    from lminf_vllm.cpu_isa import describe

    recorded = {"cpu": describe(), "preset": args.preset, "mode": args.mode,
                "args": {k: str(v) for k, v in vars(args).items()},
                "engine": {k: preset[k] for k in ("model", "dtype", "block_size", "compile", "kv_mib", "lminf")},
                "wall_s": round(wall, 2), "profiled_s": round(profiled, 2),
                "seconds_under_profile": {k: round(v, 3) for k, v in rows.items()},
                "command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])])}  # fmt: skip
    out = args.out or ROOT / "benchmarks" / "results" / f"step-profile-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recorded, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
