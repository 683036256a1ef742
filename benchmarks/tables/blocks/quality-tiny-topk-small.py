"""The tiny model's top-k row again with the smallest selection (one block of 16), beside Λ's row
from another file (the two files must share settings: checked)."""

from tables.common import RESULTS, load, same_cpu
from tables.quality import topk_ratio_table


def render(doc) -> str:
    rel, base_rel = f"{RESULTS}/quality-tiny-rope-L256-topk-small.json", f"{RESULTS}/quality-tiny-rope-L256.json"
    same_cpu(rel, base_rel)  # its ratios divide one file's numbers by the other's
    small, base = load(rel), load(base_rel)
    assert small["lminf"] == base["lminf"] and small["documents"] == base["documents"], "not the same settings"
    L = small["training_length"]
    past = [n for n in small["lengths"] if n > L]
    s = small["lminf"]
    return "\n\n".join([
        topk_ratio_table(base["modes"]["lminf"]["ppl"], small["modes"]["topk"]["ppl"], small["topk"], past, L),
        f"{small['model']}, the same {len(small['documents'])} documents and G={s['global_tokens']}, "
        f"W={s['local_tokens']}, C={s['distance_cap']} as the table above; the LM-Infinite row is that table's.",
        doc.source(rel, small["command"])])
