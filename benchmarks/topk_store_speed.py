r"""Top-k decode and prefill speed of two checkouts of this repository, in alternation.

For a change to the host store (or any top-k code) that must not slow decode: runs
benchmarks/topk_speed.py (topk mode only, one engine per run) with each tree on
PYTHONPATH in turn, --rounds times (base, new, base, new, ...: the machine's drift
falls on both), and keeps the fastest decode step and prefill of each. Writes one
JSON with every run and the ratios new / base.

    git worktree add --detach /tmp/base main
    python benchmarks/topk_store_speed.py --base /tmp/base --new . --lengths 8192
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="the checkout to compare against")
    p.add_argument("--new", type=Path, default=Path("."))
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/topk-store-speed.json"))
    p.add_argument("--note", default="", help="what else ran on the machine meanwhile (kept in the JSON)")
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, tree in (("base", args.base), ("new", args.new)):
                out = Path(tmp) / f"{name}-{r}.json"
                cmd = [sys.executable, str(args.new / "benchmarks" / "topk_speed.py"), "--modes", "topk",
                       "--rounds", "1", "--gen", str(args.gen), "--out", str(out), "--lengths",
                       *map(str, args.lengths)]  # fmt: skip
                env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
                subprocess.run(cmd, env=env, check=True, cwd=args.new)
                for row in json.loads(out.read_text())["rows"]:
                    runs.append({"tree": name, "round": r, **row})
                    print(runs[-1], flush=True)
    ratios = {}
    for n in args.lengths:
        best = {t: min((x for x in runs if x["tree"] == t and x["prompt_tokens"] == n), key=lambda x: x["decode_ms"])
                for t in ("base", "new")}  # fmt: skip
        prefill = {t: max(x["prefill_tok_s"] for x in runs if x["tree"] == t and x["prompt_tokens"] == n)
                   for t in ("base", "new")}  # fmt: skip
        ratios[str(n)] = {"decode_ms_base": best["base"]["decode_ms"], "decode_ms_new": best["new"]["decode_ms"],
                          "decode_new_x_base": round(best["new"]["decode_ms"] / best["base"]["decode_ms"], 3),
                          "prefill_new_x_base": round(prefill["new"] / prefill["base"], 3)}  # fmt: skip
    commit = lambda t: subprocess.run(["git", "-C", str(t), "rev-parse", "--short", "HEAD"],  # noqa: E731
                                      capture_output=True, text=True).stdout.strip()  # fmt: skip
    doc = {"command": "python benchmarks/topk_store_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "base_commit": commit(args.base), "new_commit": commit(args.new), "note": args.note, "runs": runs, "ratios": ratios}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(ratios, indent=2), f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
