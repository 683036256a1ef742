"""Passkey with top-k: one column per depth, the device KV blocks against their bound, and stock's
accuracy on the same prompts from the other passkey file where the keys match."""

from fractions import Fraction

from tables.common import RESULTS, cell_text, load, pct, same_cpu, table, tokens


def depth_name(depth: float) -> str:
    return str(Fraction(depth).limit_denominator(12))


def row(p: dict, n: int, m: str, r: dict, depths: list) -> list:
    names = {"stock": "stock", "lminf": "Λ alone (k = 0)", "topk": f"Λ + top-k (k = {p['lminf']['topk_blocks']})"}
    by_depth = {t["depth"]: t for t in r["trials"]}

    def cell(d):
        t = by_depth.get(d)
        if t is None:
            return ""
        return "hit" if t["hit"] else f"miss (`{cell_text(t['answer'])}`)"

    kv = r["device_kv_blocks"]
    tokens_ = max(t["prompt_tokens"] for t in r["trials"])
    if m == "stock":
        decode, prefill = f"{kv['pool_decode']} (no bound)", f"{kv['pool_prefill']} (no bound)"
    else:
        decode = f"{kv['pool_decode']} + {kv['topk_buffer']} = {kv['device_decode']} / {kv['bound_decode']}"
        prefill = f"{kv['device_prefill']} / {kv['bound_prefill']}"
    return [f"{tokens(n)} ({tokens_:,})", names.get(m, m), *[cell(d) for d in depths], pct(r["accuracy"]), decode, prefill]


def render(doc) -> str:
    rel = f"{RESULTS}/passkey-topk.json"
    p = load(rel)
    res, s = p["results"], p["lminf"]
    lengths = sorted({int(n) for m in res.values() for n in m})
    depths = sorted({t["depth"] for m in res.values() for r in m.values() for t in r["trials"]})
    rows = [row(p, n, m, res[m][str(n)], depths) for n in lengths for m in res if str(n) in res[m]]
    header = ["prompt (tokens)", "mode", *[f"depth {depth_name(d)}" for d in depths], "accuracy",
              "device KV blocks per sequence, decode: pool + top-k buffer = device / bound",
              "prefill chunk: device / bound"]
    stock_rel = f"{RESULTS}/passkey-smollm2.json"
    same_cpu(rel, stock_rel)
    stock = load(stock_rel)["results"].get("stock", {})
    keys = lambda r: [(t["depth"], t["key"]) for t in r["trials"]]  # noqa: E731
    shared = [n for n in lengths if "stock" not in res and str(n) in stock
              and any(keys(stock[str(n)]) == keys(m[str(n)]) for m in res.values() if str(n) in m)]  # fmt: skip
    stock_note = ""
    if shared:
        stock_note = (" Stock attention on the same prompts (same lengths, depths and keys), from "
                      f"[`{stock_rel}`]({doc.link(stock_rel)}): "
                      + ", ".join(f"{pct(stock[str(n)]['accuracy'])} at {tokens(n)}" for n in shared) + ".")
    return "\n\n".join([
        table(header, rows),
        f"{p['model']} (trained to {p['training_length']} tokens), greedy, 8 answer tokens, float32; "
        f"G={s['global_tokens']}, W={s['local_tokens']}, C={s['distance_cap']}, blocks of B={s['block_size']}; "
        f"one request at a time, prefill in chunks of 2,048 tokens; {p['machine']}.{stock_note}",
        doc.source(rel, "` and `".join(p.get("commands", [p["command"]])), f" ({p['note']})" if "note" in p else "")])
