"""README: lminf's speed and KV memory against the baseline backend, per prompt length, for
both throughput files (ratios of two backends' rows: more than a spec's paths say)."""

from tables.commands import command
from tables.common import RESULTS, first_backend, lminf_settings, load, num, ratio, table
from tables.throughput import by_length


def render(doc) -> str:
    parts = []
    for rel, what in ((f"{RESULTS}/throughput.json", "the random 2-layer benchmark Llama"),
                      (f"{RESULTS}/throughput-smollm2.json", "SmolLM2-135M-Instruct")):
        t = load(rel)
        base = first_backend(t["args"])
        rows = []
        for n, per in by_length(t["rows"]).items():
            s, m = per[base], per["lminf"]
            rows.append([n, ratio(m["prefill_tok_s"] / s["prefill_tok_s"]), ratio(m["decode_tok_s"] / s["decode_tok_s"]),
                         num(s["kv_mib_per_seq"]), num(m["kv_mib_per_seq"])])
        parts.append(f"{what[0].upper()}{what[1:]} ({t['args']['dtype']}, {lminf_settings(t['args'])}):")
        parts.append(table(["prompt", f"prefill lminf / {base}", f"decode lminf / {base}",
                            f"KV MiB/seq {base}", "KV MiB/seq lminf"], rows))
        parts.append(doc.source(rel, command("benchmarks/throughput.py", t["args"], rel)))
    parts.append(doc.image(f"{RESULTS}/throughput.png", "Prefill and decode throughput"))
    return "\n\n".join(parts)
