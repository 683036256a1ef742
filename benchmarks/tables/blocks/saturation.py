"""benchmarks/saturation.py: one table per preset (the small Llama, SmolLM2): output tokens/s against
stock's in the same scenario, TTFT and TPOT p50/p99, requests running, preemptions."""

from tables.commands import command
from tables.common import RESULTS, ROOT, load, num, ratio, table

PRESETS = (("small", "The small random Llama (4 layers, hidden 256, 4/2 heads of 64)"),
           ("smollm2", "SmolLM2-135M-Instruct in `make serve`'s engine"))  # fmt: skip


def spread(n: int, q: float) -> str:
    """vLLM's random dataset draws lengths in n x [1 - q, 1 + q] (prompts and outputs alike)."""
    return str(n) if not q else f"{int(n * (1 - q))}-{int(n * (1 + q))}"


def load_text(r) -> str:
    if r["max_concurrency"] not in (None, "None"):
        return f"{r['num_prompts']}, one at a time"
    rate = r["request_rate"]
    return f"{r['num_prompts']}, all at once" if rate == "inf" else f"{r['num_prompts']} at {rate}/s"


def one(doc, preset: str, title: str) -> str:
    rel = f"{RESULTS}/saturation-{preset}.json"
    t = load(rel)
    stock = {r["scenario"]: r for r in t["rows"] if r["mode"] == "stock"}
    rows = []
    for r in t["rows"]:
        s = stock.get(r["scenario"])
        vs = ratio(r["output_throughput"] / s["output_throughput"]) if s else ""
        rows.append([r["scenario"], spread(r["input_len"], r["range_ratio"]), spread(r["output_len"], r["range_ratio"]), load_text(r), r["mode"], num(r["output_throughput"]), vs,
                     f"{num(r['p50_ttft_ms'], 0)} / {num(r['p99_ttft_ms'], 0)}",
                     f"{num(r['p50_tpot_ms'])} / {num(r['p99_tpot_ms'])}", r["max_running"], num(r["mean_running"]),
                     r["preemptions"]])  # fmt: skip
    e, lm = t["engine"], t["lminf"]
    engine = (f"{e['dtype']}, {'blocks of ' + str(e['block_size']) if e['block_size'] else 'blocks of 128 (vLLM CPU default)'}, "
              f"{'torch.compile' if e['compile'] else 'enforce_eager'}")  # fmt: skip
    settings = (f"{title}; {engine}; one KV budget of {t['kv_mib']} MiB for every mode (`--kv-cache-memory-bytes`); "
                f"lminf G={lm['global_tokens']}, W={lm['local_tokens']}, C={lm['distance_cap']}; lminf-topk adds "
                f"topk_blocks={t['topk_blocks']}. Each row is one `vllm bench serve` run (random prompts, seed 0, "
                f"--ignore-eos; the JSON records each command); running and preemptions are read from the server's "
                f"/metrics every 0.25 s; {t['seconds']} s in all.")  # fmt: skip
    header = ["scenario", "prompt tokens", "out tokens", "requests", "mode", "out tok/s", "x stock",
              "TTFT p50 / p99 ms", "TPOT p50 / p99 ms", "most running", "mean running", "preemptions"]  # fmt: skip
    parts = [f"**{title}**", table(header, rows), settings]
    if (ROOT / rel).with_suffix(".png").exists():
        parts.append(doc.image(rel.replace(".json", ".png"), f"Saturation, {preset}"))
    made = " then ".join(f"`{c}`" for c in t["commands"]) if "commands" in t else \
        f"`{command('benchmarks/saturation.py', t['args'], rel)}`"
    parts.append(doc.source(rel, "").replace("made by ``", f"made by {made}"))
    return "\n\n".join(parts)


def render(doc) -> str:
    return "\n\n".join(one(doc, p, title) for p, title in PRESETS if (ROOT / RESULTS / f"saturation-{p}.json").exists())
