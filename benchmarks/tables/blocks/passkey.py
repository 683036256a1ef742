"""Passkey retrieval, SmolLM2: accuracy per mode and length, then every trial with the answer's start."""

from tables.common import RESULTS, cell_text, load, pct, table


def render(doc) -> str:
    rel = f"{RESULTS}/passkey-smollm2.json"
    p = load(rel)
    res = p["results"]
    lengths = sorted({int(n) for m in res.values() for n in m})
    acc = table(["mode"] + [str(n) for n in lengths],
                [[m] + [pct(res[m][str(n)]["accuracy"]) for n in lengths] for m in res])
    rows = []
    for n in lengths:
        for m in res:
            for t in res[m][str(n)]["trials"]:
                rows.append([n, m, t["depth"], t["key"], "yes" if t["hit"] else "no", f"`{cell_text(t['answer'])}`"])
    trials = table(["length", "mode", "depth", "key", "found", "answer (start)"], rows)
    s = p["lminf"]
    return "\n\n".join([
        acc, trials,
        f"{p['model']} (trained to {p['training_length']} tokens), greedy; lminf G={s['global_tokens']}, "
        f"W={s['local_tokens']}, C={s['distance_cap']}; {p['machine']}.",
        doc.source(rel, p["command"])])
