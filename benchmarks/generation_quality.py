"""Generation quality past the training length (the paper's BLEU/ROUGE table), through the real engine.

For each held-out document and each milestone length n, the engine reads the
document's first n tokens and generates the next T tokens (100 by default),
which are scored against the document's own next T tokens with sacreBLEU
(corpus BLEU over the documents: n-gram precision) and ROUGE-L from
rouge-score (recall of the longest common subsequence; precision and F1 are in
the JSON too). Two decoding settings: greedy, and sampled (temperature and
top-p below) with a fixed seed per prompt, the same in every mode. Modes:

    1x      the baseline: the same continuation predicted by stock attention
            from only the last L - T tokens before n (L = the training length),
            so that prompt and generated tokens together stay within L: the
            model at its own length, on the same text
    stock   full attention (vLLM's CPU backend), RoPE at the true positions
    window  sliding window only: lminf with G = 0
    lminf   LM-Infinite: G global tokens, window W, distance cap C
    nocap   LM-Infinite without the cap (C = 10^9)

Every mode runs in its own vllm.LLM (the lminf modes through the plugin's
entry point) with all its prompts in one batch.

    python benchmarks/generation_quality.py --help
    python benchmarks/generation_quality.py                      # tiny-rope-L256, 1x .. 32x
    python benchmarks/generation_quality.py --model smollm2 --lengths 8192 16384 \\
        --docs 1 --modes 1x stock lminf
"""

import argparse
import contextlib
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
from mode_labels import GENERATION as MODE_LABELS  # noqa: E402
from quality import engine_options, load_documents, resolve_model, training_length  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402

MODES = ("1x", "stock", "window", "lminf", "nocap")
SETTINGS = ("greedy", "sampled")


def make_cases(documents: list[tuple[str, list[int]]], lengths: list[int], new_tokens: int) -> list[dict]:
    """One case per (document, length): the prefix, and the reference continuation after it."""
    return [{"doc": name, "n": n, "prefix": ids[:n], "reference": ids[n : n + new_tokens]}
            for name, ids in documents for n in lengths]  # fmt: skip


def prompt_for(mode: str, case: dict, L: int, new_tokens: int) -> list[int]:
    # 1x: the tail of the prefix, short enough that prompt + continuation <= L.
    return case["prefix"][-(L - new_tokens) :] if mode == "1x" else case["prefix"]


def sampling_params(setting: str, new_tokens: int, temperature: float, top_p: float, seed: int):
    from vllm import SamplingParams

    # ignore_eos: always T tokens, so every mode is scored on the same amount of text.
    if setting == "greedy":
        return SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=new_tokens, temperature=temperature, top_p=top_p, seed=seed, ignore_eos=True)


@contextlib.contextmanager
def seeded_sampling_fix():
    """Seeded requests whose prompts are prefilled in chunks kill a stock CPU engine
    (lminf_vllm/runtime_patches/patch_worker_gpu_model_runner.py): the stock modes
    opt in to the plugin's fix for the life of their engine."""
    from lminf_vllm.runtime_patches.patch_worker_gpu_model_runner import OPT_IN_ENV

    old = os.environ.get(OPT_IN_ENV)
    os.environ[OPT_IN_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[OPT_IN_ENV]
        else:
            os.environ[OPT_IN_ENV] = old


def generate(model: Path, mode: str, cases: list[dict], settings: list[str], *, new_tokens: int,
             temperature: float, top_p: float, seed: int, **engine_kw) -> dict:  # fmt: skip
    """{setting: [generated token ids per case]}, one engine for the mode."""
    from vllm import LLM

    L = training_length(model)
    prompts = [prompt_for(mode, c, L, new_tokens) for c in cases]
    longest = max(len(p) for p in prompts) + new_tokens
    if mode == "1x":
        llm = LLM(**engine_options(model, "stock", L, **engine_kw))
    else:
        llm = LLM(**engine_options(model, mode, longest, **engine_kw))
    jobs = [(s, i) for s in settings for i in range(len(cases))]
    try:
        with seeded_sampling_fix():  # read when the runner first samples
            outs = llm.generate(
                [{"prompt_token_ids": prompts[i]} for _, i in jobs],
                # The seed depends on the case only: every mode draws with the same generator.
                [sampling_params(s, new_tokens, temperature, top_p, seed + i) for s, i in jobs],
                use_tqdm=False,
            )
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    got: dict = {s: [None] * len(cases) for s in settings}
    for (s, i), o in zip(jobs, outs):
        got[s][i] = list(o.outputs[0].token_ids)
    return got


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacreBLEU, default 13a tokenization) and mean ROUGE-L over the pairs."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, hyp)["rougeL"] for hyp, ref in zip(hypotheses, references)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 3),
        "rouge_l_recall": round(100 * mean([r.recall for r in rouge]), 3),
        "rouge_l_precision": round(100 * mean([r.precision for r in rouge]), 3),
        "rouge_l_f1": round(100 * mean([r.fmeasure for r in rouge]), 3),
        "sentence_bleu": [round(sacrebleu.sentence_bleu(h, [r]).score, 3) for h, r in zip(hypotheses, references)],
    }


def pooled(result: dict, mode: str, setting: str, lengths: list[int]) -> dict:
    """The scores of every (document, length) pair at the given lengths taken as one corpus."""
    hyps, refs = [], []
    for n in lengths:
        by_n = result["modes"][mode][setting]
        r = by_n[n] if n in by_n else by_n[str(n)]  # str keys after a JSON round trip
        hyps += r["texts"]
        refs += [result["references"][f"{d}@{n}"] for d in result["documents"]]
    return score(hyps, refs)


def summarize(result: dict) -> dict:
    """Pooled scores per mode and setting past the training length: over the
    lengths >= 4x where the run has any (the paper's regime), else over those > 1x."""
    L, lengths = result["training_length"], result["lengths"]
    past = [n for n in lengths if n >= 4 * L] or [n for n in lengths if n > L]
    if not past:
        return {}
    out = {"lengths": past, "modes": {}}
    for mode, per_setting in result["modes"].items():
        out["modes"][mode] = {}
        for s in per_setting:
            p = pooled(result, mode, s, past)
            out["modes"][mode][s] = {k: v for k, v in p.items() if k != "sentence_bleu"}
    return out


def tokenizer_decode(model: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def run(model: Path, lengths: list[int], modes: list[str], docs: int, *, settings=SETTINGS, new_tokens: int = 100,
        temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, **engine_kw) -> dict:  # fmt: skip
    from tqdm import tqdm

    L = training_length(model)
    lengths = sorted(lengths)
    if "1x" in modes and lengths[0] < L - new_tokens:
        raise SystemExit(f"the 1x baseline needs lengths >= L - T = {L - new_tokens}")
    documents = load_documents(model, docs, lengths[-1] + new_tokens)
    cases = make_cases(documents, lengths, new_tokens)
    decode = tokenizer_decode(model)
    references = [decode(c["reference"]) for c in cases]
    result = {
        "model": model.name, "training_length": L, "lengths": lengths, "new_tokens": new_tokens,
        "corpus": corpus.corpus_info(), "documents": [name for name, _ in documents], "settings": list(settings),
        "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed},
        "references": {f"{c['doc']}@{c['n']}": r for c, r in zip(cases, references)}, "modes": {},
    }  # fmt: skip
    bar = tqdm(modes, desc=f"modes ({docs} docs x {len(lengths)} lengths, up to {lengths[-1]} tokens)", file=sys.stderr)
    for mode in bar:
        bar.set_postfix_str(mode)
        got = generate(model, mode, cases, list(settings), new_tokens=new_tokens, temperature=temperature,
                       top_p=top_p, seed=seed, **engine_kw)  # fmt: skip
        per_setting = {}
        for s in settings:
            texts = [decode(ids) for ids in got[s]]
            per_n = {}
            for n in lengths:
                idx = [i for i, c in enumerate(cases) if c["n"] == n]
                per_n[n] = score([texts[i] for i in idx], [references[i] for i in idx])
                per_n[n]["texts"] = [texts[i] for i in idx]
            per_setting[s] = per_n
        result["modes"][mode] = per_setting
    result["pooled"] = summarize(result)
    return result


def cell(r: dict) -> str:
    return f"{r['bleu']:.1f} / {r['rouge_l_recall']:.1f}"


def table(result: dict, setting: str) -> str:
    L = result["training_length"]
    cols = [f"{n} ({n / L:g}x)" for n in result["lengths"]]
    lines = ["| mode | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for mode, r in result["modes"].items():
        lines.append(f"| {MODE_LABELS[mode]} | " + " | ".join(cell(r[setting][n]) for n in result["lengths"]) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:  # the plot needs the bench extra: pip install -e '.[bench]'
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    metrics = (("bleu", "BLEU"), ("rouge_l_recall", "ROUGE-L recall"))
    fig, axes = plt.subplots(len(settings), 2, figsize=(10, 3.6 * len(settings)), squeeze=False)
    for row, s in enumerate(settings):
        for col, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for mode, r in result["modes"].items():
                ax.plot(result["lengths"], [r[s][n][key] for n in result["lengths"]], marker="o",
                        label=MODE_LABELS[mode], linestyle="--" if mode == "1x" else "-")  # fmt: skip
            ax.axvline(result["training_length"], color="gray", linestyle=":", label="training length")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prefix length (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"{label}, {s}")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (benchmarks/models/tiny-rope-L256), 'smollm2', or an HF directory")
    p.add_argument("--lengths", type=int, nargs="+", help="milestone prefix lengths in tokens (default: 1x..32x the training length)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--docs", type=int, default=4, help="held-out documents per length")
    p.add_argument("--new-tokens", type=int, default=100, help="T: tokens generated and scored per prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="for the sampled setting")
    p.add_argument("--top-p", type=float, default=0.95, help="for the sampled setting")
    p.add_argument("--seed", type=int, default=0, help="sampled setting: prompt i uses seed + i in every mode")
    p.add_argument("--global-tokens", type=int, default=10, help="G for lminf and nocap")
    p.add_argument("--local-tokens", type=int, help="W (default: the training length)")
    p.add_argument("--distance-cap", type=int, help="C (default: the training length)")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--out", type=Path, help="JSON path (default: out/generation-<model>.json; the PNG beside it)")
    return p.parse_args(argv)


def main(argv=None):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    args = parse_args(argv)
    model = resolve_model(args.model)
    L = training_length(model)
    lengths = args.lengths or [L * k for k in (1, 2, 4, 8, 16, 32)]
    result = run(
        model, lengths, args.modes, args.docs, settings=args.settings, new_tokens=args.new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, global_tokens=args.global_tokens,
        local_tokens=args.local_tokens or L, distance_cap=args.distance_cap or L,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
    )  # fmt: skip
    result["lminf"] = {"global_tokens": args.global_tokens, "local_tokens": args.local_tokens or L,
                       "distance_cap": args.distance_cap or L}  # fmt: skip
    result["command"] = "python benchmarks/generation_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    out = args.out or Path("out") / f"generation-{model.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "cpu": describe()}, indent=2) + "\n")
    cfg = result["lminf"]
    title = f"{model.name}: G={cfg['global_tokens']} W={cfg['local_tokens']} C={cfg['distance_cap']}"
    plotted = plot(result, out.with_suffix(".png"), title)
    for s in args.settings:
        print(f"\n{model.name}, {s}: BLEU / ROUGE-L recall of {args.new_tokens} generated tokens; {title}")
        print(table(result, s))
    print(f"\nwrote {out}" + (f" and {out.with_suffix('.png')}" if plotted else " (no plot: matplotlib missing)"))


if __name__ == "__main__":
    main()
