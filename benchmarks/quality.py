"""Length generalization through the real engine: per-token NLL far past the training length.

Each held-out document is read once at the longest length through vLLM with
prompt logprobs; the NLL of the token at position p is then its loss given the
p tokens before it, so one pass gives every shorter length too. Modes:

    segments  the baseline: the same tokens cut into pieces of the training
              length, each read on its own (the model at 1x, on the same text)
    stock   full attention (vLLM's CPU backend), RoPE at the true positions
    window  sliding window only: lminf with G = 0
    lminf   LM-Infinite: G global tokens, window W, distance cap C
    nocap   LM-Infinite without the cap (C = 10^9)
    topk    LM-Infinite (same G, W, C) plus the k best middle KV blocks per
            (sequence, layer, KV head) from the host store
            (docs/topk-contract.md): topk_blocks = --topk-blocks, KV block
            size --topk-block-size (the other modes keep block size 32)

The table reports perplexity per length n over the tokens at positions
[previous n, n) (the first column: [1, n)), like the paper's Table 1; the
segments row gives, for the very same tokens, the model's perplexity with at
most its training length of context, so each column compares like with like.
The plot shows NLL against position with the training length marked.

    python benchmarks/quality.py --help
    python benchmarks/quality.py                       # tiny-rope-L256, 1x .. 32x
    python benchmarks/quality.py --model smollm2 --lengths 256 512 1024 2048 \\
        --modes stock window lminf --global-tokens 4 --local-tokens 256
"""

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
from mode_labels import QUALITY as MODE_LABELS  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402

HERE = Path(__file__).resolve().parent
TINY_MODEL = HERE / "models" / "tiny-rope-L256"
NO_CAP = 10**9
MODES = ("segments", "stock", "window", "lminf", "nocap", "topk")


def resolve_model(name: str) -> Path:
    if name == "tiny":
        return TINY_MODEL
    if name == "smollm2":
        from lminf_vllm.prepare_model import DEFAULT_OUT, prepare

        return DEFAULT_OUT if (DEFAULT_OUT / "config.json").exists() else prepare(DEFAULT_OUT)
    return Path(name)


def training_length(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["max_position_embeddings"])


def engine_options(model: Path, mode: str, max_model_len: int, *, global_tokens: int, local_tokens: int,
                   distance_cap: int, kv_cache_bytes: int, step_tokens: int = 2048,
                   topk_blocks: int = 4, topk_block_size: int = 64) -> dict:  # fmt: skip
    """vllm.LLM(...) arguments for one mode (topk_blocks and topk_block_size: the topk mode only)."""
    options = dict(
        model=str(model), dtype="float32", enforce_eager=True,
        block_size=topk_block_size if mode == "topk" else 32, seed=0,
        max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_bytes,
        enable_prefix_caching=False, max_num_batched_tokens=step_tokens,
    )  # fmt: skip
    if mode in ("stock", "segments"):
        options["attention_backend"] = "CPU_ATTN"
        if max_model_len > training_length(model):
            # Stock RoPE past the table, done right: a table as long as the
            # sequences (vLLM's CPU rotary op would read past a shorter one).
            options["hf_overrides"] = {"max_position_embeddings": max_model_len}
        return options
    cfg = {
        "window": dict(global_tokens=0, local_tokens=local_tokens, distance_cap=distance_cap),
        "lminf": dict(global_tokens=global_tokens, local_tokens=local_tokens, distance_cap=distance_cap),
        "nocap": dict(global_tokens=global_tokens, local_tokens=local_tokens, distance_cap=NO_CAP),
        "topk": dict(global_tokens=global_tokens, local_tokens=local_tokens, distance_cap=distance_cap,
                     topk_blocks=topk_blocks),
    }[mode]
    options.update(attention_backend="lminf", additional_config={"lminf": cfg})
    return options


def token_nll(model: Path, mode: str, docs: list[list[int]], **engine_kw) -> torch.Tensor:
    """[len(docs), n - 1] float64: -log p(token p | tokens < p) for p = 1 .. n-1, one engine."""
    from vllm import LLM, SamplingParams

    n = len(docs[0])
    # segments: every piece of the training length is its own sequence; the
    # first token of a piece has no prediction (NaN below).
    piece = training_length(model) if mode == "segments" else n
    prompts = [d[a : a + piece] for d in docs for a in range(0, n, piece)]
    llm = LLM(**engine_options(model, mode, piece + 1, **engine_kw))
    try:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
            use_tqdm=False,
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    flat = []
    for o, p in zip(outs, prompts):
        flat += [float("nan")] + [-e[t].logprob for e, t in zip(o.prompt_logprobs[1:], p[1:])]
    return torch.tensor(flat, dtype=torch.float64).view(len(docs), n)[:, 1:]


def ppl_by_length(nll: torch.Tensor, lengths: list[int]) -> dict[int, float]:
    """Perplexity over positions [previous length, length) for each length (first: [1, length))."""
    mean = nll.nanmean(dim=0)  # over documents; index p - 1 is position p
    out, lo = {}, 1
    for n in lengths:
        out[n] = math.exp(float(mean[lo - 1 : n - 1].nanmean()))
        lo = n
    return out


def smoothed_curve(nll: torch.Tensor, bins: int = 48) -> tuple[list[int], list[float]]:
    """Mean NLL in log-spaced position bins: (bin end positions, NLL)."""
    mean = nll.nanmean(dim=0)
    n = mean.numel() + 1
    edges = sorted({int(round(math.exp(x))) for x in torch.linspace(0, math.log(n), bins + 1).tolist()} | {1, n})
    pos, val = [], []
    for a, b in zip(edges, edges[1:]):
        if b > a:
            pos.append(b - 1)
            val.append(round(float(mean[a - 1 : b - 1].nanmean()), 4))
    return pos, val


def load_documents(model: Path, count: int, n_tokens: int) -> list[tuple[str, list[int]]]:
    """The longest documents of the pinned held-out sample, cut to n_tokens tokens of the model's tokenizer."""
    if model.resolve() == TINY_MODEL.resolve():
        encode = corpus.encode
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    docs = corpus.held_out_documents(n_tokens, encode)[:count]
    if len(docs) < count:
        raise SystemExit(f"only {len(docs)} pinned documents have {n_tokens} tokens; ask for fewer or shorter")
    return [(name, ids[:n_tokens]) for name, ids in docs]


def run(model: Path, lengths: list[int], modes: list[str], docs: int, **engine_kw) -> dict:
    from tqdm import tqdm

    lengths = sorted(lengths)
    documents = load_documents(model, docs, lengths[-1])
    result = {"model": model.name, "training_length": training_length(model), "lengths": lengths,
              "corpus": corpus.corpus_info(), "documents": [name for name, _ in documents], "modes": {}}  # fmt: skip
    for mode in tqdm(modes, desc=f"modes ({docs} docs x {lengths[-1]} tokens)", file=sys.stderr):
        nll = token_nll(model, mode, [ids for _, ids in documents], **engine_kw)
        pos, val = smoothed_curve(nll)
        result["modes"][mode] = {"ppl": ppl_by_length(nll, lengths), "curve_positions": pos, "curve_nll": val}
    return result


def table(result: dict) -> str:
    L = result["training_length"]
    cols = [f"{n} ({n / L:g}x)" for n in result["lengths"]]
    lines = ["| mode | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for mode, r in result["modes"].items():
        lines.append(f"| {MODE_LABELS[mode]} | " + " | ".join(f"{r['ppl'][n]:.2f}" for n in result["lengths"]) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:  # the plot needs the bench extra: pip install -e '.[bench]'
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, r in result["modes"].items():
        ax.plot(r["curve_positions"], r["curve_nll"], label=MODE_LABELS[mode])
    ax.axvline(result["training_length"], color="gray", linestyle="--", label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position")
    ax.set_ylabel("NLL (nats/token), mean over documents")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (benchmarks/models/tiny-rope-L256), 'smollm2', or an HF directory")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths in tokens (default: 1x..32x the training length)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--docs", type=int, default=4, help="pinned held-out documents averaged per length (4 at most)")
    p.add_argument("--global-tokens", type=int, default=10, help="G for lminf, nocap and topk")
    p.add_argument("--local-tokens", type=int, help="W (default: the training length)")
    p.add_argument("--distance-cap", type=int, help="C (default: the training length)")
    p.add_argument("--topk-blocks", type=int, default=4, help="k for the topk mode: middle blocks read again")
    p.add_argument("--topk-block-size", type=int, default=64, help="KV block size B of the topk mode")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--out", type=Path, help="JSON path (default: out/quality-<model>.json; the PNG beside it)")
    return p.parse_args(argv)


def main(argv=None):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    args = parse_args(argv)
    model = resolve_model(args.model)
    L = training_length(model)
    lengths = args.lengths or [L * k for k in (1, 2, 4, 8, 16, 32)]
    topk_kw = {"topk_blocks": args.topk_blocks, "topk_block_size": args.topk_block_size} if "topk" in args.modes else {}
    result = run(
        model, lengths, args.modes, args.docs, global_tokens=args.global_tokens,
        local_tokens=args.local_tokens or L, distance_cap=args.distance_cap or L,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)), **topk_kw,
    )  # fmt: skip
    result["lminf"] = {"global_tokens": args.global_tokens, "local_tokens": args.local_tokens or L,
                       "distance_cap": args.distance_cap or L}  # fmt: skip
    if topk_kw:
        result["topk"] = {"topk_blocks": args.topk_blocks, "block_size": args.topk_block_size}
    result["command"] = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    out = args.out or Path("out") / f"quality-{model.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "cpu": describe()}, indent=2) + "\n")
    cfg = result["lminf"]
    title = f"{model.name}: G={cfg['global_tokens']} W={cfg['local_tokens']} C={cfg['distance_cap']}"
    if "topk" in result:
        title += f" (top-k: k={result['topk']['topk_blocks']} B={result['topk']['block_size']})"
    plotted = plot(result, out.with_suffix(".png"), title)
    print(f"\n{model.name}, perplexity of the tokens at positions [previous length, length); {title}")
    print(table(result))
    print(f"\nwrote {out}" + (f" and {out.with_suffix('.png')}" if plotted else " (no plot: matplotlib missing)"))


if __name__ == "__main__":
    main()
