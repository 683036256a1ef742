"""Perplexity per length, from a file of benchmarks/quality.py: the "quality" kind of spec.

    {"kind": "quality", "file": "benchmarks/results/quality-X.json",
     "image": "alt text" or null, "ratios": [["stock", "segments"], ...], "topk": false}

"ratios" adds a table of ppl(a) / ppl(b) per length for the pairs whose modes the file has;
"topk": false leaves the top-k row out. Also the Λ-against-top-k table of two bespoke blocks.
"""

from mode_labels import QUALITY as MODE_NAMES
from tables.common import Doc, load, num, ratio, table, tokens


SHORT_NAMES = {"segments": "1x", "stock": "stock", "window": "window only", "lminf": "LM-Infinite", "nocap": "no cap",
               "topk": "top-k"}


def quality_table(q: dict) -> str:
    L = q["training_length"]
    lengths = q["lengths"]
    header = ["mode"] + [f"{n} ({n / L:g}x)" if n * 8 >= L else str(n) for n in lengths]
    rows = [[MODE_NAMES[m]] + [num(q["modes"][m]["ppl"][str(n)], 2) for n in lengths] for m in q["modes"]]
    return table(header, rows)


def quality_ratios(q: dict, pairs: list) -> str:
    """Rows of ppl(a) / ppl(b) per length, for the (a, b) pairs present in the file."""
    lengths = q["lengths"]
    rows = [[f"{SHORT_NAMES[a]} / {SHORT_NAMES[b]}"]
            + [ratio(q["modes"][a]["ppl"][str(n)] / q["modes"][b]["ppl"][str(n)]) for n in lengths]
            for a, b in pairs if a in q["modes"] and b in q["modes"]]
    return table(["perplexity ratio"] + [tokens(n) for n in lengths], rows)


def render(doc: Doc, spec: dict) -> str:
    rel = spec["file"]
    q = load(rel)
    if not spec.get("topk", True):  # the file without its top-k row
        q = {**{k: v for k, v in q.items() if k != "topk"}, "modes": {m: r for m, r in q["modes"].items() if m != "topk"}}
    parts = [quality_table(q)]
    if spec.get("ratios"):
        parts.append(quality_ratios(q, spec["ratios"]))
    s = q["lminf"]
    topk = q.get("topk")
    topk_note = (f"; top-k: the same G, W, C plus topk_blocks k={topk['topk_blocks']} with KV block size "
                 f"B={topk['block_size']} (the other modes: B=32)") if topk else ""
    parts.append(f"Perplexity of the tokens in [previous length, length) of {len(q['documents'])} held-out "
                 f"documents ({', '.join(q['documents'])}); {q['model']}, trained to {q['training_length']} "
                 f"tokens; lminf G={s['global_tokens']}, W={s['local_tokens']}, C={s['distance_cap']}{topk_note}; "
                 f"{q['machine'].split(', Linux')[0]}.")
    if spec.get("image"):
        parts.append(doc.image(rel.replace(".json", ".png"), spec["image"]))
    source = doc.source(rel, q["command"])
    if topk and topk.get("command"):  # the top-k row run on its own and merged into the file
        source = source[:-1] + f"; its top-k row by `{topk['command']}`."
    parts.append(source)
    return "\n\n".join(parts)


def topk_ratio_table(lam: dict, top: dict, topk: dict, lengths: list[int], L: int) -> str:
    """Λ's and top-k's perplexity per length and their ratio (ppl dicts keyed by str(length))."""
    name = f"top-k (k = {topk['topk_blocks']}, B = {topk['block_size']})"
    rows = [["LM-Infinite"] + [num(lam[str(n)], 3) for n in lengths],
            [name] + [num(top[str(n)], 3) for n in lengths],
            [f"{name} / LM-Infinite"] + [f"{top[str(n)] / lam[str(n)]:.4f}" for n in lengths]]
    return table(["perplexity"] + [f"{n} ({n / L:g}x)" for n in lengths], rows)
