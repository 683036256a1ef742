r"""Top-k against Λ alone on the same tokens: per document, and how sure the difference is.

quality.py gives one perplexity per mode and length range, averaged over a few
documents. This reads the same documents through both engines (the same
settings as quality.py's `--modes lminf topk`), keeps every token's NLL, and
over the positions [--start, --stop) reports:
  * each document's perplexity in both modes and their ratio;
  * the mean NLL difference (top-k minus Λ) with a 95% confidence interval
    from a paired bootstrap over runs of --run tokens (neighbouring tokens are
    not independent, so whole runs are resampled), and the perplexity ratio
    that interval gives.

    python benchmarks/quality_paired.py --local-tokens 128 --distance-cap 128 --topk-blocks 2 \
        --topk-block-size 32 --start 4096 --stop 8192 --out benchmarks/results/quality-tiny-topk-w128-paired.json
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import quality  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', 'smollm2', or an HF directory (as quality.py)")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--start", type=int, required=True, help="first position compared")
    p.add_argument("--stop", type=int, required=True, help="positions before this are compared; the documents' length")
    p.add_argument("--global-tokens", type=int, default=10)
    p.add_argument("--local-tokens", type=int, required=True)
    p.add_argument("--distance-cap", type=int, required=True)
    p.add_argument("--topk-blocks", type=int, default=4)
    p.add_argument("--topk-block-size", type=int, default=64)
    p.add_argument("--run", type=int, default=64, help="tokens per resampled run of the bootstrap")
    p.add_argument("--samples", type=int, default=5000, help="bootstrap resamples")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def paired_interval(diff: torch.Tensor, run: int, samples: int) -> tuple[float, float]:
    """95% interval of the mean of diff [docs, n] by resampling whole runs of `run` tokens."""
    runs = diff[:, : diff.shape[1] // run * run].reshape(-1, run).mean(dim=1)
    g = torch.Generator().manual_seed(0)
    means = runs[torch.randint(0, len(runs), (samples, len(runs)), generator=g)].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return lo, hi


def main(argv=None):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    args = parse_args(argv)
    model = quality.resolve_model(args.model)
    documents = quality.load_documents(model, args.docs, args.stop)
    engine_kw = dict(global_tokens=args.global_tokens, local_tokens=args.local_tokens,
                     distance_cap=args.distance_cap, kv_cache_bytes=2 << 30, topk_blocks=args.topk_blocks,
                     topk_block_size=args.topk_block_size)  # fmt: skip
    # token_nll's column p - 1 is position p
    nll = {mode: quality.token_nll(model, mode, [ids for _, ids in documents], **engine_kw)[:, args.start - 1 :]
           for mode in ("lminf", "topk")}  # fmt: skip
    lam, topk = nll["lminf"], nll["topk"]
    diff = topk - lam
    lo, hi = paired_interval(diff, args.run, args.samples)
    result = {
        "model": model.name, "training_length": quality.training_length(model), "positions": [args.start, args.stop],
        "lminf": {"global_tokens": args.global_tokens, "local_tokens": args.local_tokens,
                  "distance_cap": args.distance_cap},
        "topk": {"topk_blocks": args.topk_blocks, "block_size": args.topk_block_size},
        "documents": [{"name": name, "ppl_lminf": round(math.exp(a.mean()), 4),
                       "ppl_topk": round(math.exp(b.mean()), 4), "ratio": round(math.exp((b - a).mean()), 4)}
                      for (name, _), a, b in zip(documents, lam, topk)],
        "ppl_lminf": round(math.exp(lam.mean()), 4), "ppl_topk": round(math.exp(topk.mean()), 4),
        "ratio": round(math.exp(diff.mean()), 4),
        "mean_nll_difference": round(float(diff.mean()), 5), "interval_95": [round(lo, 5), round(hi, 5)],
        "ratio_interval_95": [round(math.exp(lo), 4), round(math.exp(hi), 4)],
        "bootstrap": {"run_tokens": args.run, "samples": args.samples},
        "corpus": quality.corpus.corpus_info(),
        "command": "python benchmarks/quality_paired.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "cpu": describe()}, indent=2) + "\n")
    for d in result["documents"]:
        print(f"{d['name']:16s} Λ {d['ppl_lminf']:.4f}  top-k {d['ppl_topk']:.4f}  ratio {d['ratio']:.4f}")
    print(f"all: ratio {result['ratio']:.4f}, 95% interval {result['ratio_interval_95']}\nwrote {args.out}")


if __name__ == "__main__":
    main()
