"""Prefill and decode speed per backend, from a file of benchmarks/throughput.py: the
"throughput" kind of spec, {"kind": "throughput", "file": ..., "image": "alt text"}."""

from tables.commands import command
from tables.common import Doc, first_backend, home, lminf_settings, load, num, ratio, table


def by_length(rows: list[dict], key: str = "prompt_tokens") -> dict:
    """{length: {backend: row}}, in the file's order."""
    out: dict = {}
    for r in rows:
        out.setdefault(r[key], {})[r["backend"]] = r
    return out


def throughput_table(t: dict) -> str:
    base = first_backend(t["args"])
    rows = []
    for n, per in by_length(t["rows"]).items():
        for b, r in per.items():
            s = per.get(base)
            rows.append([n, b, num(r["prefill_tok_s"]), num(r["decode_tok_s"]), num(r["ms_per_output_token"], 2),
                         ratio(r["prefill_tok_s"] / s["prefill_tok_s"]) if s else "",
                         ratio(r["decode_tok_s"] / s["decode_tok_s"]) if s else "",
                         r["kv_blocks_per_seq"], num(r["kv_mib_per_seq"])])
    return table(["prompt", "backend", "prefill tok/s", "decode tok/s", "ms/output token",
                  f"prefill x {base}", f"decode x {base}", "KV blocks/seq", "KV MiB/seq"], rows)


def throughput_settings(a: dict) -> str:
    model = home(a["model"]) if a["model"] != "None" else "the random 2-layer Llama of `benchmarks/kv_memory.py`"
    return (f"Model: {model}; {a['dtype']}; batch of {a['batch']}, {a['gen']} tokens generated each; "
            f"lminf {lminf_settings(a)}; blocks of {a['block_size']}; chunks of {a['step_tokens']} tokens; "
            f"best of {a['repeats']} timed runs.")


def render(doc: Doc, spec: dict) -> str:
    rel = spec["file"]
    t = load(rel)
    return "\n\n".join([throughput_table(t), throughput_settings(t["args"]),
                        doc.source(rel, command("benchmarks/throughput.py", t["args"], rel)),
                        doc.image(rel.replace(".json", ".png"), spec["image"])])
