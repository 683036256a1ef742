"""benchmarks/decode_batch.py: ms per decode step against the batch, per mode, and the per-row slopes."""

from tables.commands import command
from tables.common import RESULTS, load, num, ratio, table


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
    return "\n\n".join([table(header, rows), settings, doc.image(rel.replace(".json", ".png"), "Decode step against the batch"),
                        doc.source(rel, command("benchmarks/decode_batch.py", t["args"], rel))])  # fmt: skip
