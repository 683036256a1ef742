"""Plot benchmarks/gpu_kernel.py results: decode µs/step and prefill ms against
sequence length, Λ-attention vs full attention, log-log.

    python benchmarks/plot_gpu_kernel.py benchmarks/results/gpu-h200/gpu_kernel_decode.json \\
        benchmarks/results/gpu-h200/gpu_kernel_prefill.json --out benchmarks/results/gpu-h200/gpu_kernel.png
"""

import argparse
import json
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="+", help="JSON files written by gpu_kernel.py")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, device = [], None
    for path in args.results:
        data = json.loads(path.read_text())
        rows += data["rows"]
        device = data["meta"]["device"]
    modes = [m for m in ("decode", "prefill") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        key, unit = ("us", "µs per decode step") if mode == "decode" else ("ms", "ms per prefill")
        for kernel in dict.fromkeys(r["kernel"] for r in rows if r["mode"] == mode):
            pts = sorted((r["n"], r[key]) for r in rows if r["mode"] == mode and r["kernel"] == kernel)
            ax.plot(*zip(*pts), marker="o", label=kernel)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(unit)
        batch = next((r.get("batch") for r in rows if r["mode"] == mode and r.get("batch")), 1)
        ax.set_title(f"{mode}, batch {batch}" if mode == "decode" else "prefill, one request")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Triton Λ-attention vs full attention on {device}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
