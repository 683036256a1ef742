r"""One session that never ends: real text streamed into one request, millions of tokens.

The RoPE model trained here (benchmarks/models/tiny-rope-L256: 4 layers, trained on
256-token windows) reads the pinned held-out corpus, cycled, as one vLLM
streaming-input session (AsyncLLM.generate over StreamingInput chunks; docs/sessions.md):
--chunk tokens of text per chunk, one greedy token answered after each. The engine
core runs in its own process, as `vllm serve` runs it; max_model_len is 2^30.

Every --every tokens it records: the resident memory of the whole process tree
(front-end and engine core), the KV blocks the session holds (lminf's scheduler
stats), the chunks' latency (chunk sent -> answer back) and the negative
log-likelihood of the text: at the end of each chunk the answer step returns the
model's whole next-token distribution (logprobs over the 257-token vocabulary),
which gives the probability of the text's next token, the first of the next chunk
(vLLM returns prompt logprobs only for a streaming session's first chunk). The
yardstick is the model's own NLL at its training length (256-token windows of the
same text, transformers, full attention): over all positions, and at the last
position of each window (a full 255-token context, as the session always has). Results JSON and a plot; the rate, and how long
LM-Infinite's 200M tokens would take at it.

    python benchmarks/endless.py --tokens 10000000 --out benchmarks/results/endless.json
"""

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

MODEL = HERE / "models" / "tiny-rope-L256"
PAPER_TOKENS = 200_000_000  # LM-Infinite's longest fluent generation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--tokens", type=int, default=10_000_000, help="session length to reach")
    p.add_argument("--chunk", type=int, default=4096, help="tokens of text per streamed chunk")
    p.add_argument("--every", type=int, default=200_000, help="record a sample every this many tokens")
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--block-size", type=int, default=None, help="KV block size (default: vLLM's)")
    p.add_argument("--out", type=Path, default=Path("out/endless.json"))
    return p.parse_args(argv)


def corpus_tokens() -> list[int]:
    """The pinned held-out corpus as the byte model's ids, documents separated by end-of-text."""
    from corpus import encode_concat, pinned_documents

    return encode_concat([text for _, text in pinned_documents()]).tolist()


def load_model(model: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def nll_at_training_length(lm, ids: list[int], length: int, windows: int = 200) -> tuple[float, float]:
    """Mean NLL over `windows` windows of `length` tokens (full attention): per predicted token,
    and of each window's last token only."""
    import torch

    step = max(length, len(ids) // windows)
    total, count, last = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, len(ids) - length, step)[:windows]:
            x = torch.tensor([ids[start : start + length]])
            logp = torch.log_softmax(lm(x).logits[0, :-1].double(), -1)
            token_nll = -logp.gather(1, x[0, 1:, None])[:, 0]
            total += token_nll.sum().item()
            count += length - 1
            last.append(token_nll[-1].item())
    return total / count, statistics.fmean(last)


def nll_of_next_tokens(lm, ids: list[int], starts: list[int], length: int) -> list[float]:
    """The model's NLL (full attention, transformers) of ids[p] given the length - 1 tokens before
    it, for each p in `starts` (the corpus cycled): the same tokens the session predicted, paired."""
    import torch

    cycled = ids + ids
    out = []
    with torch.no_grad():
        for a in range(0, len(starts), 64):
            batch = [(p % len(ids)) + len(ids) for p in starts[a : a + 64]]
            x = torch.tensor([cycled[p - length + 1 : p + 1] for p in batch])
            logp = torch.log_softmax(lm(x[:, :-1]).logits[:, -1].double(), -1)
            out += (-logp.gather(1, x[:, -1:])[:, 0]).tolist()
    return out


def tree_rss_mib() -> float:
    from soak import tree_rss_bytes

    return tree_rss_bytes(os.getpid()) / 2**20


def held_blocks_logger():
    """A vLLM stat logger that keeps the latest lminf scheduler stats (KV blocks held)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    latest = {}

    class Latest(StatLoggerBase):
        def __init__(self, vllm_config, engine_index=0):
            pass

        def record(self, scheduler_stats, iteration_stats, *args, **kwargs):
            stats = getattr(scheduler_stats, "lminf_stats", None)
            if stats:
                latest.update(stats)

        def log_engine_initialized(self):
            pass

    return Latest, latest


async def run_session(args, ids: list[int], samples: list, progress) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import StreamingInput
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from lminf_vllm.metrics import HELD

    logger, latest = held_blocks_logger()
    engine_args = AsyncEngineArgs(
        model=str(args.model), attention_backend="lminf", max_model_len=1 << 30, seed=0,
        additional_config={"lminf": {"global_tokens": args.global_tokens}},
        max_logprobs=-1,  # the whole next-token distribution (the byte model's 257 tokens)
        **({"block_size": args.block_size} if args.block_size else {}),
    )  # fmt: skip
    llm = AsyncLLM.from_engine_args(engine_args, stat_loggers=[logger])
    vocab = llm.vllm_config.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=vocab,
                            output_kind=RequestOutputKind.DELTA)  # fmt: skip
    chunks = math.ceil(args.tokens / args.chunk)
    answered = asyncio.Event()
    sent_at = [0.0]

    async def feed():
        for c in range(chunks):
            start = (c * args.chunk) % len(ids)
            chunk = (ids + ids)[start : start + args.chunk] if start + args.chunk > len(ids) else ids[start : start + args.chunk]
            answered.clear()
            sent_at[0] = time.perf_counter()
            yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=chunk))
            await answered.wait()

    t0 = time.perf_counter()
    done, tokens, last_sample, since = 0, 0, 0, 0
    info = {"max_num_seqs": llm.vllm_config.scheduler_config.max_num_seqs,
            "block_size": llm.vllm_config.cache_config.block_size,
            "dtype": str(llm.vllm_config.model_config.dtype)}  # fmt: skip
    try:
        async for out in llm.generate(feed(), params, request_id="endless"):
            if not out.outputs[0].token_ids:
                continue
            latency = time.perf_counter() - sent_at[0]
            nxt = ids[((done + 1) * args.chunk) % len(ids)]  # the text's next token: the next chunk's first
            nll = -out.outputs[0].logprobs[0][nxt].logprob
            done += 1
            tokens += args.chunk + 1  # the chunk and the answer
            progress.append((tokens, latency, nll))
            if tokens - last_sample >= args.every or done == chunks:
                last_sample = tokens
                recent, since = progress[since:], len(progress)  # the chunks since the last sample
                samples.append({
                    "tokens": tokens, "seconds": time.perf_counter() - t0, "rss_mib": tree_rss_mib(),
                    "kv_blocks_held": latest.get(HELD), "chunk_latency_s": statistics.median(x[1] for x in recent),
                    "nll": statistics.fmean(x[2] for x in recent), "chunks": len(recent),
                })  # fmt: skip
                s = samples[-1]
                print(f"{tokens:>12,d} tokens  {s['seconds']:7.0f} s  RSS {s['rss_mib']:7.0f} MiB  "
                      f"KV blocks {s['kv_blocks_held']}  chunk {s['chunk_latency_s'] * 1e3:6.1f} ms  NLL {s['nll']}", flush=True)
            answered.set()
    finally:
        llm.shutdown()
    info["seconds"] = time.perf_counter() - t0
    return info


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["samples"]
    x = [r["tokens"] / 1e6 for r in s]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    series = [("rss_mib", "resident memory, MiB (all processes)"), ("kv_blocks_held", "KV blocks held"),
              ("chunk_latency_s", f"latency per {results['chunk']}-token chunk, s"), ("nll", "NLL per token (last chunks)")]  # fmt: skip
    for ax, (key, title) in zip(axes, series):
        ax.plot(x, [r[key] for r in s], marker=".")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("session length, million tokens")
        ax.set_ylim(bottom=0)
    axes[3].axhline(results["nll_at_training_length"], color="gray", linestyle="--", label="model at its training length")
    axes[3].legend(fontsize=8)
    fig.suptitle(f"One streaming session, {results['model']}, lminf G={results['global_tokens']} (W = C = 256)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(results: dict) -> dict:
    s = [r for r in results["samples"]]
    tenth = max(1, len(s) // 10)
    first, last = s[1 : 1 + tenth] or s[:tenth], s[-tenth:]  # the first sample is warm-up
    million = [r for r in s if r["tokens"] >= 1_000_000]
    rss_slope = ((million[-1]["rss_mib"] - million[0]["rss_mib"]) * 2**20 / (million[-1]["tokens"] - million[0]["tokens"])
                 if len(million) > 1 else None)  # fmt: skip
    rate = s[-1]["tokens"] / s[-1]["seconds"]
    tail = results["chunks"][-max(1, len(results["chunks"]) // 10) :]
    nll, paired = statistics.fmean(c["nll"] for c in tail), statistics.fmean(c["nll_paired_1x"] for c in tail)
    return {
        "tokens": s[-1]["tokens"],
        "tokens_per_s": rate,
        "hours_for_200M_tokens": PAPER_TOKENS / rate / 3600,
        "kv_blocks_held": sorted({r["kv_blocks_held"] for r in s if r["kv_blocks_held"] is not None}),
        "rss_bytes_per_token_after_1M": rss_slope,
        "latency_last_tenth_over_first_tenth": statistics.median(r["chunk_latency_s"] for r in last)
        / statistics.median(r["chunk_latency_s"] for r in first),
        "nll_last_tenth": nll,
        "nll_paired_1x_last_tenth": paired,
        "nll_last_tenth_over_paired_1x": nll / paired,
        "nll_last_tenth_over_training_length": nll / results["nll_at_training_length"],
        "nll_last_tenth_over_training_length_last_position": nll / results["nll_at_training_length_last_position"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the engine core in its own process
    from corpus import corpus_info

    from lminf_vllm.cpu_isa import describe

    ids = corpus_tokens()
    config = json.loads((args.model / "config.json").read_text())
    results = {
        "command": "python benchmarks/endless.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": describe(), "model": args.model.name, "corpus": corpus_info(), "corpus_tokens": len(ids),
        "chunk": args.chunk, "global_tokens": args.global_tokens,
        "training_length": config["max_position_embeddings"],
    }  # fmt: skip
    lm = load_model(args.model)
    results["nll_at_training_length"], results["nll_at_training_length_last_position"] = nll_at_training_length(
        lm, ids, config["max_position_embeddings"])
    print(f"NLL at the training length ({results['training_length']} tokens): {results['nll_at_training_length']:.4f} "
          f"(last position: {results['nll_at_training_length_last_position']:.4f})")
    samples, progress = [], []
    results.update(asyncio.run(run_session(args, ids, samples, progress)))
    results["samples"] = samples
    # the same next tokens, each with its 255 tokens before it and full attention: a paired yardstick
    paired = nll_of_next_tokens(lm, ids, [(c + 1) * args.chunk for c in range(len(progress))],
                                results["training_length"])  # fmt: skip
    results["chunks"] = [{"tokens": t, "latency_s": round(lat, 5), "nll": round(n, 5), "nll_paired_1x": round(q, 5)}
                         for (t, lat, n), q in zip(progress, paired)]  # fmt: skip
    results["summary"] = summarize(results)
    step = max(1, args.tokens // 10)  # the first sample past each tenth of the session, for tables
    results["milestones"] = [next(r for r in samples if r["tokens"] >= k * step) for k in range(1, 11)
                             if any(r["tokens"] >= k * step for r in samples)]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(results["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
