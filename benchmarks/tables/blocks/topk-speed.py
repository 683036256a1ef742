"""Top-k's speed against Λ: each engine's decode step, and the ratios as a sentence."""

from tables.commands import command
from tables.common import RESULTS, load, num, ratio, table


def render(doc) -> str:
    rel = f"{RESULTS}/topk-speed.json"
    t = load(rel)
    a, rows = t["args"], t["rows"]
    names = {"lambda": "Λ alone (k = 0)", "topk": f"Λ + top-k (k = {a['topk_blocks']})"}
    body = [[names[r["mode"]], f"{r['prompt_tokens']:,}", num(r["prefill_tok_s"]), num(r["decode_ms"], 2),
             ", ".join(num(x, 2) for x in r.get("decode_ms_each_round", [r["decode_ms"]]))] for r in rows]
    ratios = "; ".join(f"at {int(n):,} tokens top-k's decode step takes {ratio(x['decode_topk_x_lambda'])} Λ's and its "
                       f"prefill runs at {ratio(x['prefill_topk_x_lambda'])} Λ's rate" for n, x in t["ratios"].items())  # fmt: skip
    r0 = rows[0]
    settings = (f"SmolLM2-135M-Instruct, {r0['dtype']}, blocks of {r0['block_size']}, "
                f"{'torch.compile' if r0['compiled'] else 'enforce_eager'}, steps of {a['step_tokens']} tokens, "
                f"G={a['global_tokens']}, W={a['local_tokens']}, C={a['distance_cap']}; decode over {a['gen']} steps; "
                f"one request; {a.get('rounds', '1')} engines per mode, started in alternation, the fastest "
                f"counts; {t['seconds']} s in all. {ratios[0].upper() + ratios[1:]}.")  # fmt: skip
    header = ["mode", "prompt tokens", "prefill tok/s", "decode ms/step", "decode ms/step, each engine"]
    return "\n\n".join([table(header, body), settings,
                         doc.source(rel, command("benchmarks/topk_speed.py", t["args"], rel))])
