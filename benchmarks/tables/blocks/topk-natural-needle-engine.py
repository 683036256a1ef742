"""The natural-text needle through the engine: found per variant, per depth, the share of the
engine's selections that held the needle, and the misses' answers."""

import statistics

from tables.common import RESULTS, cell_text, load, pct, table


def render(doc) -> str:
    rel = f"{RESULTS}/topk-natural-needle-engine.json"
    t = load(rel)
    a = t["args"]
    depths = sorted({x["depth"] for v in t["variants"].values() for x in v["trials"]})
    rows = []
    for name, v in t["variants"].items():
        per_depth = [f"{sum(x['hit'] for x in v['trials'] if x['depth'] == d)} / "
                     f"{sum(1 for x in v['trials'] if x['depth'] == d)}" for d in depths]  # fmt: skip
        shares = [x["needle_selected_share"] for x in v["trials"] if x.get("needle_selected_share") is not None]
        misses = "; ".join(f"{x['document']} {pct(x['depth'])}: `{cell_text(x['answer'])}`"
                           for x in v["trials"] if not x["hit"])  # fmt: skip
        rows.append([name, f"**{v['found']} / {v['of']}**", *per_depth, pct(statistics.mean(shares)) if shares else "",
                     f"{statistics.median(x['seconds'] for x in v['trials']):.1f}", misses or "none"])  # fmt: skip
    header = ["variant", "found", *[f"needle at {pct(d)}" for d in depths], "needle selected", "s per trial",
              "misses (document, depth: answer)"]  # fmt: skip
    e = next(iter(t["variants"].values()))["engine"]
    settings = (f"{t['model']}, vllm.LLM in one process, {e['dtype']}, blocks of {e['block_size']}, "
                f"{'enforce_eager' if e['enforce_eager'] else 'torch.compile'}, steps of {a['step_tokens']} tokens, one "
                f"request at a time, greedy, {a['max_new']} new tokens; G={a['global_tokens']}, W={a['local_tokens']}, "
                f"C={a['distance_cap']} for every lminf engine; prompts of "
                f"{min(x['prompt_tokens'] for v in t['variants'].values() for x in v['trials']):,}-"
                f"{max(x['prompt_tokens'] for v in t['variants'].values() for x in v['trials']):,} tokens. "
                f"\"needle selected\": share of the engine's (step, layer, KV head) selections for the trial's request "
                f"(its prompt's chunks and decode rows past the first middle block) holding a block of the needle "
                f"sentence, mean over the trials. {t['seconds']} s in all.")  # fmt: skip
    return "\n\n".join([table(header, rows), settings,
                         doc.source(rel, t["command"].strip())])  # (the command as run: its --out was the default)
