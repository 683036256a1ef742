"""benchmarks/decode_batch.py: ms per decode step against the batch, per mode, and the per-row slopes."""

from tables.commands import command
from tables.common import RESULTS, ROOT, load, num, ratio, table


def render(doc) -> str:
    rel = f"{RESULTS}/decode-batch.json"
    t = load(rel)
    batches = [p["batch"] for p in t["modes"][0]["points"]]
    rows = []
    for m in t["modes"]:
        slope_x = ratio(m["per_row_x_stock"]) if "per_row_x_stock" in m else ""
        big_x = ratio(m["per_row_b16_up_x_stock"]) if "per_row_b16_up_x_stock" in m else ""
        rows.append([m["mode"], m["prompt_tokens"], m["keys_per_row"], *(num(p["ms_per_step"], 2) for p in m["points"]),
                     num(m["ms_per_row"], 3), slope_x, num(m["ms_per_row_b16_up"], 3), big_x])  # fmt: skip
    a = t["args"]
    header = ["mode", "prompt", "keys/row", *(f"b={b}" for b in batches), "ms/row (fit 1-64)", "x stock",
              "ms/row (fit 16-64)", "x stock"]  # fmt: skip
    settings = (f"ms per engine step in which every row decodes (mean over {a['steps']} steps, the fastest of {a.get('repeats', 1)} runs); model "
                f"{a['model'] if a['model'] != 'small' else 'the small random Llama of benchmarks/saturation.py'}, "
                f"{a['dtype']}, blocks of {a['block_size']}, {'torch.compile' if a['compile'] == 'True' else 'enforce_eager'}; "
                f"lminf G={a['global_tokens']}, W=C={a['local_tokens']}; request k's prompt is the mode's plus k % "
                f"{a['block_size']} tokens; each `x stock` compares a mode with the stock mode at the same keys per row "
                f"(lminf-inside with stock-inside, lminf-past with stock); {t['seconds']} s in all.")  # fmt: skip
    parts = [table(header, rows), settings]
    now = {m["mode"]: m for m in t["modes"]}
    again_rel = f"{RESULTS}/decode-batch-rerun.json"
    if (ROOT / again_rel).exists():  # the machine is shared: the spread of the slopes between runs
        a2 = {m["mode"]: m for m in load(again_rel)["modes"]}
        parts.append(
            f"A second run of the same code, `--modes stock lminf-past` ([`{again_rel}`]({doc.link(again_rel)})): "
            f"lminf-past {num(a2['lminf-past']['ms_per_row'], 3)} ms/row against stock's "
            f"{num(a2['stock']['ms_per_row'], 3)} ({ratio(a2['lminf-past']['per_row_x_stock'])}; fitted from 16 rows up "
            f"{ratio(a2['lminf-past']['per_row_b16_up_x_stock'])}), {num(a2['lminf-past']['points'][-1]['ms_per_step'], 2)} "
            f"ms at b={a2['lminf-past']['points'][-1]['batch']} against stock's "
            f"{num(a2['stock']['points'][-1]['ms_per_step'], 2)}.")  # fmt: skip
    more = [f"{RESULTS}/decode-batch-rerun-{n}.json" for n in (2, 3)]
    if all((ROOT / rel).exists() for rel in more):  # two later runs of the whole command, one after the other
        runs = [{m["mode"]: m for m in load(rel)["modes"]} for rel in more]
        files = ", ".join(f"[`{rel}`]({doc.link(rel)})" for rel in more)
        past = lambda key: " and ".join(ratio(r["lminf-past"][key]) for r in runs)  # noqa: E731
        every = [now["lminf-past"], *(r["lminf-past"] for r in runs)]
        if (ROOT / again_rel).exists():
            every.append(a2["lminf-past"])
        spread = lambda key: f"{ratio(min(m[key] for m in every))}-{ratio(max(m[key] for m in every))}"  # noqa: E731
        parts.append(
            f"Two more runs of the whole command at 30aa28e, one after the other ({files}, made by "
            f"`python benchmarks/decode_batch.py --out FILE`): lminf-past against stock {past('per_row_x_stock')} "
            f"(fitted 1-64 rows), {past('per_row_b16_up_x_stock')} (fitted from 16 rows up). Over the {len(every)} runs "
            f"the slope fitted from 1 to 64 rows is {spread('per_row_x_stock')} stock's, from 16 rows up "
            f"{spread('per_row_b16_up_x_stock')}: the 1.1x line holds for the large batches it is about, not for "
            "every fit.")  # fmt: skip
    # the same benchmark on the code before two changes to the decode step, same machine
    for name, change, rev, modes in (
        ("decode-batch-before.json", "gathers the front rows' copies once per layer", "5568fd8", " `--modes stock lminf-past`"),
        ("decode-batch-per-front-calls.json", "gives the front rows scratch blocks in the shared call (one kernel "
         "call a layer; before, one more per front row) and rotates the copies elementwise", "3f0e32c", " the same command"),
    ):  # fmt: skip
        before_rel = f"{RESULTS}/{name}"
        if not (ROOT / before_rel).exists():
            continue
        b = {m["mode"]: m for m in load(before_rel)["modes"]}
        parts.append(
            f"Before the change that {change} (commit {rev}'s `lminf_vllm`, [`{before_rel}`]({doc.link(before_rel)}), "
            f"same machine,{modes}): lminf-past {num(b['lminf-past']['ms_per_row'], 3)} ms/row against stock's "
            f"{num(b['stock']['ms_per_row'], 3)} ({ratio(b['lminf-past']['ms_per_row'] / b['stock']['ms_per_row'])}), "
            f"{num(b['lminf-past']['points'][-1]['ms_per_step'], 2)} ms at b={b['lminf-past']['points'][-1]['batch']} "
            f"against {num(now['lminf-past']['points'][-1]['ms_per_step'], 2)} now.")  # fmt: skip
    return "\n\n".join(parts + [doc.image(rel.replace(".json", ".png"), "Decode step against the batch"),
                        doc.source(rel, command("benchmarks/decode_batch.py", t["args"], rel))])  # fmt: skip
