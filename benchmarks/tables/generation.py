"""BLEU / ROUGE-L per prefix length, from a file of benchmarks/generation_quality.py:
the "generation" kind of spec, {"kind": "generation", "file": ..., "image": "alt text"}."""

from tables.common import Doc, load, lminf_settings, num, ratio, table
from mode_labels import GENERATION as GEN_MODE_NAMES


def pooled_table(g: dict) -> str:
    """Each mode's scores pooled over the longer lengths, and its ROUGE-L against 1x's."""
    L, pooled = g["training_length"], g["pooled"]
    base = pooled["modes"].get("1x")
    header = ["pooled over " + ", ".join(f"{n / L:g}x" for n in pooled["lengths"])]
    for s in g["settings"]:
        header += [f"{s} BLEU", f"{s} ROUGE-L"] + ([f"{s} ROUGE-L / 1x"] if base else [])
    rows = []
    for m, per in pooled["modes"].items():
        row = [GEN_MODE_NAMES[m]]
        for s in g["settings"]:
            row += [num(per[s]["bleu"], 2), num(per[s]["rouge_l_recall"], 2)]
            if base:
                row.append(ratio(per[s]["rouge_l_recall"] / base[s]["rouge_l_recall"]))
        rows.append(row)
    return table(header, rows)


def render(doc: Doc, spec: dict) -> str:
    rel = spec["file"]
    g = load(rel)
    L, lengths = g["training_length"], g["lengths"]
    parts = []
    for s in g["settings"]:
        header = [f"{s}: BLEU / ROUGE-L recall"] + [f"{n} ({n / L:g}x)" for n in lengths]
        rows = [[GEN_MODE_NAMES[m]] + [f"{num(r[s][str(n)]['bleu'])} / {num(r[s][str(n)]['rouge_l_recall'])}"
                                       for n in lengths] for m, r in g["modes"].items()]
        parts.append(table(header, rows))
    if g.get("pooled"):
        parts.append(pooled_table(g))
    a, sm = g["lminf"], g["sampling"]
    parts.append(f"{g['new_tokens']} tokens generated after each prefix and scored against the document's next "
                 f"{g['new_tokens']} (corpus BLEU of sacreBLEU over the documents; ROUGE-L recall of rouge-score, "
                 f"mean over the documents); {len(g['documents'])} held-out document"
                 f"{'s' if len(g['documents']) > 1 else ''} ({', '.join(g['documents'])}); "
                 f"{g['model']}, trained to {L} tokens; lminf {lminf_settings(a)}; "
                 + (f"sampled: temperature {sm['temperature']}, top-p {sm['top_p']}, seed {sm['seed']} + prompt index; "
                    if "sampled" in g["settings"] else "")
                 + f"{g['machine'].split(', Linux')[0]}.")
    parts.append(doc.image(rel.replace(".json", ".png"), spec["image"]))
    parts.append(doc.source(rel, g["command"]))
    return "\n\n".join(parts)
