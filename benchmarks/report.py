r"""Render the measured numbers in README.md and docs/*.md from benchmarks/results/.

Every block between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` is
written by the function registered here as NAME, from the files in
benchmarks/results/, and names its source file and the command that made it.
Nothing between the markers is typed by hand: after a benchmark rewrites its
JSON, run this script; `tests/test_docs.py` runs `--check`.

    python benchmarks/report.py          # rewrite the blocks in place
    python benchmarks/report.py --check  # exit 1 if a block differs from its rendering

Standard library only (no vLLM, no matplotlib): it runs anywhere in a second.
"""

import argparse
import ast
import difflib
import json
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
GPU = f"{RESULTS}/gpu-h200"

BLOCK = re.compile(r"(<!-- generated:([\w.-]+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.S)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def load(rel: str):
    return json.loads((ROOT / rel).read_text())


class Doc:
    """The markdown file a block is rendered into: links are relative to it."""

    def __init__(self, path: Path):
        self.dir = path.parent

    def link(self, rel: str) -> str:
        return Path(os.path.relpath(ROOT / rel, self.dir)).as_posix()

    def source(self, rel: str, command: str, note: str = "") -> str:
        """The line under a table: which file, which command."""
        return f"Source: [`{rel}`]({self.link(rel)}){note}; made by `{command}`."

    def image(self, rel: str, alt: str) -> str:
        return f"![{alt}]({self.link(rel)})"


# --- formatting -----------------------------------------------------------


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def sci(x: float) -> str:
    return f"{x:.1e}"


def span(values: list[float], fmt=ratio) -> str:
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


# --- commands, rebuilt from the arguments a benchmark recorded -------------


def script_defaults(script: str) -> dict:
    """Literal argparse defaults of a benchmark script and the shared options,
    read from the source (importing the script would import vLLM)."""
    defaults: dict = {}
    source = (ROOT / script).read_text()
    shared = "benchmarks/shape_args.py" if "shape_args" in source else None
    for name in filter(None, (script, shared)):
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
                continue
            flag = next((a.value for a in node.args if isinstance(a, ast.Constant)), "")
            if not str(flag).startswith("--"):
                continue
            key = flag[2:].replace("-", "_")
            if key in defaults:  # the script's own option wins over a shared one
                continue
            for kw in node.keywords:
                if kw.arg == "default":
                    try:
                        defaults[key] = ast.literal_eval(kw.value)
                    except ValueError:
                        pass
                elif kw.arg == "action" and getattr(kw.value, "value", "") == "store_true":
                    defaults[key] = False
    return defaults


def home(value: str) -> str:
    return re.sub(r"^/(root|home/[^/]+)/", "~/", value)


def command(script: str, args: dict, out: str) -> str:
    """`python SCRIPT` with the options whose recorded value is not the script's
    default (the JSON stores str() of each value), writing to `out`."""
    defaults = script_defaults(script)
    parts = [f"python {script}"]
    for key, value in args.items():
        if key == "out" or (key in defaults and str(defaults[key]) == value):
            continue
        flag = "--" + key.replace("_", "-")
        if value == "True":
            parts.append(flag)
            continue
        if value in ("None", "False"):
            continue
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        items = parsed if isinstance(parsed, list) else [parsed]
        parts.append(flag + " " + " ".join(home(str(v)) for v in items))
    parts.append(f"--out {out}")
    return " ".join(parts)


def gpu_run_command() -> str:
    return f"OUT={GPU} bash benchmarks/gpu_run.sh"


def lminf_settings(args: dict) -> str:
    return f"G={args['global_tokens']}, W={args['local_tokens']}, C={args['distance_cap']}"


# --- quality and passkey ----------------------------------------------------

MODE_NAMES = {
    "segments": "1x: each training-length piece read alone",
    "stock": "stock attention",
    "window": "window only (G=0)",
    "lminf": "LM-Infinite",
    "nocap": "LM-Infinite, no distance cap",
    "topk": "LM-Infinite + top-k middle blocks",
}


SHORT_NAMES = {"segments": "1x", "stock": "stock", "window": "window only", "lminf": "LM-Infinite", "nocap": "no cap",
               "topk": "top-k"}


def quality_table(q: dict) -> str:
    L = q["training_length"]
    lengths = q["lengths"]
    header = ["mode"] + [f"{n} ({n / L:g}x)" if n * 8 >= L else str(n) for n in lengths]
    rows = [[MODE_NAMES[m]] + [num(q["modes"][m]["ppl"][str(n)], 2) for n in lengths] for m in q["modes"]]
    return table(header, rows)


def quality_ratios(q: dict, pairs: list[tuple[str, str]]) -> str:
    """Rows of ppl(a) / ppl(b) per length, for the (a, b) pairs present in the file."""
    lengths = q["lengths"]
    rows = [[f"{SHORT_NAMES[a]} / {SHORT_NAMES[b]}"]
            + [ratio(q["modes"][a]["ppl"][str(n)] / q["modes"][b]["ppl"][str(n)]) for n in lengths]
            for a, b in pairs if a in q["modes"] and b in q["modes"]]
    return table(["perplexity ratio"] + [tokens(n) for n in lengths], rows)


def quality_block(doc: Doc, rel: str, image_alt: str | None, ratios: list | None, topk: bool = True) -> str:
    q = load(rel)
    if not topk:  # the file without its top-k row
        q = {**{k: v for k, v in q.items() if k != "topk"}, "modes": {m: r for m, r in q["modes"].items() if m != "topk"}}
    parts = [quality_table(q)]
    if ratios:
        parts.append(quality_ratios(q, ratios))
    s = q["lminf"]
    topk = q.get("topk")
    topk_note = (f"; top-k: the same G, W, C plus topk_blocks k={topk['topk_blocks']} with KV block size "
                 f"B={topk['block_size']} (the other modes: B=32)") if topk else ""
    parts.append(f"Perplexity of the tokens in [previous length, length) of {len(q['documents'])} held-out "
                 f"documents ({', '.join(q['documents'])}); {q['model']}, trained to {q['training_length']} "
                 f"tokens; lminf G={s['global_tokens']}, W={s['local_tokens']}, C={s['distance_cap']}{topk_note}; "
                 f"{q['machine'].split(', Linux')[0]}.")
    if image_alt:
        parts.append(doc.image(rel.replace(".json", ".png"), image_alt))
    source = doc.source(rel, q["command"])
    if topk and topk.get("command"):  # the top-k row run on its own and merged into the file
        source = source[:-1] + f"; its top-k row by `{topk['command']}`."
    parts.append(source)
    return "\n\n".join(parts)


def gen_quality_tiny(doc):
    return quality_block(doc, f"{RESULTS}/quality-tiny-rope-L256.json", "NLL against position, tiny-rope-L256",
                         [("stock", "segments"), ("lminf", "segments"), ("nocap", "segments"), ("nocap", "lminf"),
                          ("topk", "lminf")])


def topk_ratio_table(lam: dict, top: dict, topk: dict, lengths: list[int], L: int) -> str:
    """Λ's and top-k's perplexity per length and their ratio (ppl dicts keyed by str(length))."""
    name = f"top-k (k = {topk['topk_blocks']}, B = {topk['block_size']})"
    rows = [["LM-Infinite"] + [num(lam[str(n)], 3) for n in lengths],
            [name] + [num(top[str(n)], 3) for n in lengths],
            [f"{name} / LM-Infinite"] + [f"{top[str(n)] / lam[str(n)]:.4f}" for n in lengths]]
    return table(["perplexity"] + [f"{n} ({n / L:g}x)" for n in lengths], rows)


def gen_quality_tiny_topk_small(doc):
    """The tiny model's top-k row again with the smallest selection (one block of 16), beside Λ."""
    rel, base_rel = f"{RESULTS}/quality-tiny-rope-L256-topk-small.json", f"{RESULTS}/quality-tiny-rope-L256.json"
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


def topk_against_lambda(doc: Doc, rel: str) -> str:
    """A file with the lminf and topk modes only: both rows and their ratio at every length."""
    from lminf_vllm.block_policy import topk_attended_tokens

    q = load(rel)
    L, s, t = q["training_length"], q["lminf"], q["topk"]
    attended = topk_attended_tokens(s["global_tokens"], s["local_tokens"], t["block_size"], t["topk_blocks"])
    return "\n\n".join([
        topk_ratio_table(q["modes"]["lminf"]["ppl"], q["modes"]["topk"]["ppl"], t, q["lengths"], L),
        f"{q['model']}, trained to {L} tokens; {len(q['documents'])} held-out documents "
        f"({', '.join(q['documents'])}); G={s['global_tokens']}, W={s['local_tokens']}, C={s['distance_cap']} for "
        f"both rows (LM-Infinite with KV blocks of 32); with top-k a query attends at most {attended:,} keys "
        f"(`block_policy.topk_attended_tokens`), {'within' if attended <= L else 'more than'} the training length.",
        doc.source(rel, q["command"])])


def gen_quality_topk_within_training(doc):
    """Top-k against Λ in settings where a query attends no more keys than the model was trained with."""
    return "\n\n".join(topk_against_lambda(doc, f"{RESULTS}/{name}.json")
                       for name in ("quality-smollm2-topk-w2048", "quality-tiny-rope-L256-topk-w128"))


def gen_quality_smollm2_globals(doc):
    return quality_block(doc, f"{RESULTS}/quality-smollm2-globals.json", "NLL against position, SmolLM2, W=256",
                         [("window", "lminf"), ("lminf", "stock")])


def gen_quality_smollm2_16k(doc):
    return quality_block(doc, f"{RESULTS}/quality-smollm2-16k.json", "NLL against position, SmolLM2 to 16k",
                         [("stock", "segments"), ("lminf", "segments"), ("topk", "lminf")])


def gen_readme_quality(doc):
    # No top-k row in the README (its 250-line limit): docs/quality.md has it.
    return quality_block(doc, f"{RESULTS}/quality-smollm2-16k.json", "NLL against position, SmolLM2 to 16k", None,
                         topk=False)


def gen_passkey(doc):
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
                answer = t["answer"].replace("\n", " ").replace("|", "\\|").strip()
                rows.append([n, m, t["depth"], t["key"], "yes" if t["hit"] else "no", f"`{answer}`"])
    trials = table(["length", "mode", "depth", "key", "found", "answer (start)"], rows)
    s = p["lminf"]
    return "\n\n".join([
        acc, trials,
        f"{p['model']} (trained to {p['training_length']} tokens), greedy; lminf G={s['global_tokens']}, "
        f"W={s['local_tokens']}, C={s['distance_cap']}; {p['machine']}.",
        doc.source(rel, p["command"])])


def depth_name(depth: float) -> str:
    from fractions import Fraction

    return str(Fraction(depth).limit_denominator(12))


def gen_passkey_topk(doc):
    rel = f"{RESULTS}/passkey-topk.json"
    p = load(rel)
    res, s = p["results"], p["lminf"]
    k = s["topk_blocks"]
    names = {"stock": "stock", "lminf": "Λ alone (k = 0)", "topk": f"Λ + top-k (k = {k})"}
    lengths = sorted({int(n) for m in res.values() for n in m})
    depths = sorted({t["depth"] for m in res.values() for r in m.values() for t in r["trials"]})
    rows = []
    for n in lengths:
        for m in res:
            if str(n) not in res[m]:
                continue
            r = res[m][str(n)]
            by_depth = {t["depth"]: t for t in r["trials"]}

            def cell(d):
                t = by_depth.get(d)
                if t is None:
                    return ""
                answer = t["answer"].replace("\n", " ").replace("|", "\\|").strip()
                return "hit" if t["hit"] else f"miss (`{answer}`)"

            kv = r["device_kv_blocks"]
            tokens_ = max(t["prompt_tokens"] for t in r["trials"])
            if m == "stock":
                decode, prefill = f"{kv['pool_decode']} (no bound)", f"{kv['pool_prefill']} (no bound)"
            else:
                decode = f"{kv['pool_decode']} + {kv['topk_buffer']} = {kv['device_decode']} / {kv['bound_decode']}"
                prefill = f"{kv['device_prefill']} / {kv['bound_prefill']}"
            rows.append([f"{tokens(n)} ({tokens_:,})", names.get(m, m), *[cell(d) for d in depths],
                         pct(r["accuracy"]), decode, prefill])
    header = ["prompt (tokens)", "mode", *[f"depth {depth_name(d)}" for d in depths], "accuracy",
              "device KV blocks per sequence, decode: pool + top-k buffer = device / bound",
              "prefill chunk: device / bound"]
    stock_rel = f"{RESULTS}/passkey-smollm2.json"
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


def gen_topk_speed(doc):
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


# --- generation quality (BLEU / ROUGE-L) --------------------------------------

GEN_MODE_NAMES = {"1x": "1x: stock on the last L-T tokens only", **{k: v for k, v in MODE_NAMES.items() if k != "segments"}}


def generation_block(doc: Doc, rel: str, image_alt: str) -> str:
    g = load(rel)
    L, lengths = g["training_length"], g["lengths"]
    parts = []
    for s in g["settings"]:
        header = [f"{s}: BLEU / ROUGE-L recall"] + [f"{n} ({n / L:g}x)" for n in lengths]
        rows = [[GEN_MODE_NAMES[m]] + [f"{num(r[s][str(n)]['bleu'])} / {num(r[s][str(n)]['rouge_l_recall'])}"
                                       for n in lengths] for m, r in g["modes"].items()]
        parts.append(table(header, rows))
    pooled = g.get("pooled")
    if pooled:
        base = pooled["modes"].get("1x")
        header = ["pooled over " + ", ".join(f"{n / L:g}x" for n in pooled["lengths"])]
        for s in g["settings"]:
            header += [f"{s} BLEU", f"{s} ROUGE-L"] + ([f"{s} ROUGE-L / 1x"] if base else [])
        rows = []
        for m, per in pooled["modes"].items():
            row = [GEN_MODE_NAMES[m]]
            for s in g["settings"]:
                row += [num(per[s]["bleu"], 2), num(per[s]["rouge_l_recall"], 2)]
                if base:
                    row.append(ratio(per[s]["rouge_l_recall"] / base[s]["rouge_l_recall"]))
            rows.append(row)
        parts.append(table(header, rows))
    a, sm = g["lminf"], g["sampling"]
    parts.append(f"{g['new_tokens']} tokens generated after each prefix and scored against the document's next "
                 f"{g['new_tokens']} (corpus BLEU of sacreBLEU over the documents; ROUGE-L recall of rouge-score, "
                 f"mean over the documents); {len(g['documents'])} held-out document"
                 f"{'s' if len(g['documents']) > 1 else ''} ({', '.join(g['documents'])}); "
                 f"{g['model']}, trained to {L} tokens; lminf {lminf_settings(a)}; "
                 + (f"sampled: temperature {sm['temperature']}, top-p {sm['top_p']}, seed {sm['seed']} + prompt index; "
                    if "sampled" in g["settings"] else "")
                 + f"{g['machine'].split(', Linux')[0]}.")
    parts.append(doc.image(rel.replace(".json", ".png"), image_alt))
    parts.append(doc.source(rel, g["command"]))
    return "\n\n".join(parts)


def gen_generation_tiny(doc):
    return generation_block(doc, f"{RESULTS}/generation-tiny-rope-L256.json", "BLEU and ROUGE-L against prefix length, tiny-rope-L256")


def gen_generation_smollm2(doc):
    return generation_block(doc, f"{RESULTS}/generation-smollm2.json", "BLEU and ROUGE-L against prefix length, SmolLM2")


# --- CPU speed ---------------------------------------------------------------


def by_length(rows: list[dict], key: str = "prompt_tokens") -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r[key], {})[r["backend"]] = r
    return out


def throughput_table(t: dict) -> str:
    base = ast.literal_eval(t["args"]["backends"])[0]
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


def throughput_block(doc: Doc, rel: str) -> str:
    t = load(rel)
    return "\n\n".join([throughput_table(t), throughput_settings(t["args"]),
                        doc.source(rel, command("benchmarks/throughput.py", t["args"], rel))])


def gen_throughput_cpu(doc):
    rel = f"{RESULTS}/throughput.json"
    return throughput_block(doc, rel) + "\n\n" + doc.image(rel.replace(".json", ".png"), "Prefill and decode throughput")


def gen_throughput_smollm2(doc):
    rel = f"{RESULTS}/throughput-smollm2.json"
    return throughput_block(doc, rel) + "\n\n" + doc.image(rel.replace(".json", ".png"),
                                                           "Prefill and decode throughput, SmolLM2")


def serve_speed_table(t: dict) -> str:
    past = lambda r, key, fmt: fmt(r[key]) if key in r else "cannot run"  # noqa: E731  (stock stops at its table)
    rows = [[r["backend"], num(r["prefill_inside_tok_s"]), past(r, "prefill_past_tok_s", num),
             past(r, "prefill_past_x_inside", ratio), num(r["decode_inside_ms"], 2),
             past(r, "decode_past_ms", lambda x: num(x, 2)), past(r, "decode_past_x_inside", ratio)]
            for r in t["rows"]]  # fmt: skip
    a = t["args"]
    return table(["backend", f"prefill tok/s, {a['inside']}-token prompt", f"prefill tok/s, the {a['past']} tokens after it",
                  "past / inside", f"decode ms/step at {a['decode_inside']}", f"decode ms/step at {a['decode_past']}",
                  "past / inside"], rows)  # fmt: skip


def gen_serve_speed(doc):
    rel = f"{RESULTS}/serve-speed.json"
    t = load(rel)
    lm = next(r for r in t["rows"] if r["backend"] == "lminf")
    cfg = lm["lminf"]
    settings = (f"`make serve`'s engine: SmolLM2-135M-Instruct, {lm['dtype']}, blocks of {lm['block_size']}, "
                f"{'torch.compile' if lm['compiled'] else 'enforce_eager'}, steps of {t['args']['step_tokens']} tokens, "
                f"lminf G={cfg['global_tokens']}, W={cfg['local_tokens']}, C={cfg['distance_cap']}; "
                f"best of {t['args']['repeats']} runs; {t['seconds']} s in all.")  # fmt: skip
    return "\n\n".join([serve_speed_table(t), settings, doc.source(rel, command("benchmarks/serve_speed.py", t["args"], rel))])


def gen_vllm_bench(doc):
    rel = f"{RESULTS}/vllm-bench-throughput.json"
    t = load(rel)
    base_name = ast.literal_eval(t["args"]["backends"])[0]
    base = {r["prompt_tokens"]: r for r in t["rows"] if r["backend"] == base_name}
    def row(r):
        b = base.get(r["prompt_tokens"], {})
        if "skipped" in r:
            return [r["prompt_tokens"], r["backend"], "cannot run: " + r["skipped"], "", ""]
        vs = ratio(r["tokens_per_second"] / b["tokens_per_second"]) if "tokens_per_second" in b else ""
        return [r["prompt_tokens"], r["backend"], num(r["requests_per_second"], 3), num(r["tokens_per_second"]), vs]

    rows = [row(r) for r in t["rows"]]
    a = t["args"]
    example = re.sub(r"--output-json \S+", "--output-json FILE", t["rows"][-1]["command"])
    settings = (f"SmolLM2-135M-Instruct; {a['num_prompts']} random prompts per length, {a['output_len']} tokens out "
                f"each; lminf with `make serve`'s settings (G={a['global_tokens']}, W = C = 8,192); "
                f"VLLM_CPU_KVCACHE_SPACE={a['kv_gib']}. Each row is one `vllm bench throughput` command "
                f"(recorded in the JSON), e.g. `vllm {example}`.")  # fmt: skip
    return "\n\n".join([table(["prompt", "backend", "requests/s", "tokens/s", f"tokens/s x {base_name}"], rows),
                         settings, doc.source(rel, command("benchmarks/vllm_bench.py", t["args"], rel))])


def gen_readme_speed(doc):
    parts = []
    for rel, what in ((f"{RESULTS}/throughput.json", "the random 2-layer benchmark Llama"),
                      (f"{RESULTS}/throughput-smollm2.json", "SmolLM2-135M-Instruct")):
        t = load(rel)
        base = ast.literal_eval(t["args"]["backends"])[0]
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


def gen_cpu_prefill(doc):
    rel = f"{RESULTS}/cpu_prefill.json"
    c = load(rel)
    rows = [[r["prompt"], r["chunk"], num(r["kernel_us_per_query"], 2), num(r["torch_us_per_query"], 2),
             num(r["stock_us_per_query"], 2) if r.get("stock_us_per_query") is not None else "",
             ratio(r["torch_us_per_query"] / r["kernel_us_per_query"]), sci(r["max_diff_kernel_vs_torch"])]
            for r in c["rows"]]
    a = c["args"]
    return "\n\n".join([
        table(["prompt", "chunk (last queries)", "kernel path µs/query", "PyTorch path µs/query", "stock µs/query",
               "PyTorch / kernel", "max abs. difference, kernel vs PyTorch"], rows),
        f"One layer, {a['heads']}/{a['kv_heads']} heads of {a['head_size']}, lminf {lminf_settings(a)}, "
        f"blocks of {a['block_size']}; fastest of {a['repeats']} calls.",
        doc.source(rel, command("benchmarks/cpu_prefill.py", a, rel))])


# --- memory -----------------------------------------------------------------


def gen_kv_memory(doc):
    rel = f"{RESULTS}/kv_memory.json"
    k = load(rel)
    rows = [[r["prompt_tokens"], r["backend"], r["peak_blocks_prefill"], r["peak_blocks_decode"],
             num(r["kv_bytes_per_seq"] / 2**20, 2), r["blocks_reserved_by_admission"], r["max_concurrent_seqs"],
             r["seconds"]] for r in k["rows"]]
    a = k["args"]
    model = home(a["model"]) if a["model"] != "None" else "a random 2-layer Llama (2 KV heads of 32, float32)"
    return "\n\n".join([
        table(["prompt", "backend", "blocks/seq prefill", "blocks/seq decode", "peak KV MiB/seq",
               "blocks reserved at admission", "pool admits seqs", "s"], rows),
        f"Model: {model}; one sequence per run, {a['gen']} tokens generated; a pool of {a['pool_blocks']} blocks "
        f"of {a['block_size']} tokens; chunks of {a['step_tokens']} tokens; lminf {lminf_settings(a)}.",
        doc.image(rel.replace(".json", ".png"), "KV memory per sequence"),
        doc.source(rel, command("benchmarks/kv_memory.py", a, rel))])


def gen_readme_memory(doc):
    rel = f"{RESULTS}/kv_memory.json"
    k = load(rel)
    a = k["args"]
    rows = []
    for n, per in by_length(k["rows"]).items():
        s, m = per["CPU_ATTN"], per["lminf"]
        rows.append([n, s["peak_blocks_decode"], m["peak_blocks_decode"], m["peak_blocks_prefill"],
                     s["max_concurrent_seqs"], m["max_concurrent_seqs"]])
    return "\n\n".join([
        table(["prompt", "blocks held, stock (decode)", "blocks held, lminf (decode)", "lminf (prefill)",
               f"sequences a {a['pool_blocks']}-block pool admits, stock", "lminf"], rows),
        f"Blocks of {a['block_size']} tokens, lminf {lminf_settings(a)}, chunks of {a['step_tokens']} tokens.",
        doc.source(rel, command("benchmarks/kv_memory.py", a, rel))])


# --- serving ----------------------------------------------------------------


def gen_soak(doc):
    rel = f"{RESULTS}/soak.json"
    s = load(rel)
    rounds = s["rounds"]
    rows = [[r["round"], r["requests"], r["hung_up"], r["completed"], r["complete_with_all_tokens"], r["tokens"],
             r["seconds"], num(r["peak_rss_mib"]), "yes" if r["healthy_after"] else "no"] for r in rounds]
    rss = [r["peak_rss_mib"] for r in rounds]
    steps = ", ".join(f"{b - a:+.0f}" for a, b in zip(rss, rss[1:]))
    cmd = (f"python benchmarks/soak.py --rounds {len(rounds)} --concurrency {rounds[0]['requests']} "
           f"--tokens {s['tokens_per_stream']} --out {rel}")
    return "\n\n".join([
        table(["round", "requests", "hung up", "completed", "with all tokens", "tokens", "s", "peak RSS MiB",
               "healthy after"], rows),
        f"In all: {s['total_requests']} requests, {s['total_tokens']:,} generated tokens in {s['total_seconds']} s; "
        f"problems reported: {len(s['problems'])}. Peak RSS of the server's process tree from round 1 to round "
        f"{len(rounds)}: {ratio(rss[-1] / rss[0])} (MiB per round: {steps}).",
        doc.source(rel, cmd)])


def gen_mixed_ttft(doc):
    rel = f"{RESULTS}/mixed-ttft.json"
    m = load(rel)
    runs = m["runs"]
    rows = []
    for r in runs:
        s, cap = r["short"], r["long_prefill_token_threshold"]
        uncapped = cap >= r["max_num_batched_tokens"]
        default = "" if r["server_extra_args"] else " (lminf's default)"
        what = "vLLM's uncapped chunks" if uncapped else f"cap {cap}{default}"
        rows.append([f"{r['name']}: {what}",
                     r["max_num_batched_tokens"], num(r["long"]["ttft_ms"] / 1000),
                     f"{s['sent_during_prefill']} of {s['completed']}",
                     num(s["mean_ttft_ms"] / 1000, 2), num(s["median_ttft_ms"] / 1000, 2),
                     num(s["p99_ttft_ms"] / 1000, 2), num(s["mean_tpot_ms"], 0), num(s["mean_e2el_ms"] / 1000)])
    a = m["args"]
    first = runs[0]
    args = {k: v for k, v in a.items() if k != "variant"}
    cmd = command("benchmarks/mixed_ttft.py", args, rel)
    for spec in ast.literal_eval(a.get("variant", "[]")):
        cmd = cmd.replace(" --out ", f" --variant '{spec}' --out ", 1)
    base = first["server_command"].split(" --port PORT")[0] + " --port PORT"
    by_name = {r["name"]: r for r in runs}
    summary = ""
    if "before" in by_name and "after" in by_name:
        b, f = by_name["before"], by_name["after"]
        summary = (f"Before and after, in one invocation: the short requests' mean time to first token "
                   f"{num(b['short']['mean_ttft_ms'] / 1000)} s -> {num(f['short']['mean_ttft_ms'] / 1000)} s "
                   f"(p99 {num(b['short']['p99_ttft_ms'] / 1000)} s -> {num(f['short']['p99_ttft_ms'] / 1000)} s); "
                   f"the long prompt's {num(b['long']['ttft_ms'] / 1000)} s -> {num(f['long']['ttft_ms'] / 1000)} s.")
    loads = ", ".join(f"{r['name']} {r['load_average_1min'][0]:.1f}-{r['load_average_1min'][1]:.1f}" for r in runs)
    return "\n\n".join([
        table(["server", "step budget", "long prompt's TTFT s", "short requests sent during its prefill",
               "short TTFT mean s", "median s", "p99 s", "short TPOT ms", "short latency s"], rows),
        summary,
        f"One long prompt of {first['long']['input_tokens']:,} tokens ({a['long_output']} generated) and "
        f"{first['short']['completed']} short ones (about {a['short_input']} tokens, {a['short_output']} generated) "
        f"at {a['short_rate']} requests/s, each stream from its own `vllm bench serve`; the server is `make serve`'s "
        f"(model {home(m['model'])}, bfloat16, G=10, max_model_len 131072, VLLM_CPU_KVCACHE_SPACE={a['kv_cache_gib']}) "
        f"with the extra options each run names below, every one importing the same copy of `lminf_vllm` "
        f"(digest {m['lminf_vllm_sha256']}, tree at {m['git_head']}). {m['cpus']} CPU cores shared with other jobs "
        f"(1-minute load average at the start and end of each run: {loads}).",
        f"Server: `{base}`, plus per run: "
        + "; ".join(f"{r['name']} " + (f"`{shlex.join(x)}`" if (x := r["server_extra_args"]) else "nothing")
                    for r in runs) + ".",
        f"Long client: `{first['long_command']}`; short client: `{first['short_command']}`.",
        doc.source(rel, cmd)])


# --- GPU kernels (H200) -----------------------------------------------------


def gpu_rows(rel: str) -> dict:
    out: dict = {}
    for r in load(rel)["rows"]:
        out.setdefault((r["mode"], r["n"]), {})[r["kernel"]] = r
    return out


def gpu_meta(rel: str) -> str:
    m = load(rel)["meta"]
    a = m["args"]
    return (f"{m['device']}, torch {m['torch']}; {a['heads']} query heads and {a['kv_heads']} KV heads of "
            f"{a['head_size']}, {a['dtype']}, blocks of {a['block_size']} in permuted order, lminf "
            f"{lminf_settings(a)}; full attention is PyTorch SDPA restricted to FlashAttention (GQA inside the "
            f"kernel) on contiguous K/V; median of {a['iters']} CUDA-graph replays; bandwidth against "
            f"{m['peak_gbps'] / 1000:g} TB/s.")


def gen_gpu_env(doc):
    rel = f"{GPU}/env.txt"
    lines = (ROOT / rel).read_text().strip().splitlines()
    return "\n\n".join(["```\n" + "\n".join(lines) + "\n```", doc.source(rel, gpu_run_command())])


def gen_gpu_decode(doc):
    rel = f"{GPU}/gpu_kernel_decode.json"
    rows = []
    for (mode, n), k in sorted(gpu_rows(rel).items()):
        lam, fa, full = k["lambda"], k["sdpa-flash-gqa"], k.get("lambda-as-full")
        rows.append([tokens(n), num(lam["us"]), f"{lam['gbps']:.0f} ({pct(lam['of_peak'])})", num(fa["us"]),
                     f"{fa['gbps']:.0f} ({pct(fa['of_peak'])})", ratio(fa["us"] / lam["us"]),
                     f"{num(full['us'])} ({full['gbps']:.0f})" if full else ""])
    batch = load(rel)["meta"]["args"]["batch"]
    return "\n\n".join([
        f"Decode, {batch} requests of n tokens, one query each:",
        table(["n", "Λ µs/step", "Λ GB/s (of peak)", "flash µs/step", "flash GB/s (of peak)", "Λ speed-up",
               "our kernel as full attention (G=0, W=C=n) µs (GB/s)"], rows),
        gpu_meta(rel), doc.source(rel, gpu_run_command())])


def gen_gpu_prefill(doc):
    rel = f"{GPU}/gpu_kernel_prefill.json"
    rows = []
    for (mode, n), k in sorted(gpu_rows(rel).items()):
        lam, fa = k["lambda"], k["sdpa-flash-gqa"]
        rows.append([tokens(n), num(lam["ms"], 2), f"{lam['tflops']:.0f}", num(fa["ms"], 2), f"{fa['tflops']:.0f}",
                     ratio(fa["ms"] / lam["ms"])])
    return "\n\n".join([
        "Prefill, one request of n tokens in one call (TFLOP/s count only the query-key pairs the mask keeps):",
        table(["n", "Λ ms", "Λ TFLOP/s", "flash ms", "flash TFLOP/s", "Λ speed-up"], rows),
        doc.source(rel, gpu_run_command())])


def gen_readme_gpu(doc):
    dec, pre = f"{GPU}/gpu_kernel_decode.json", f"{GPU}/gpu_kernel_prefill.json"
    d, p = gpu_rows(dec), gpu_rows(pre)
    rows = []
    for (mode, n), k in sorted(d.items()):
        q = p.get(("prefill", n), {})
        rows.append([tokens(n), ratio(k["sdpa-flash-gqa"]["us"] / k["lambda"]["us"]),
                     ratio(q["sdpa-flash-gqa"]["ms"] / q["lambda"]["ms"]) if q else ""])
    return "\n\n".join([
        table(["n", "decode: Λ speed-up over FlashAttention", "prefill: Λ speed-up"], rows),
        gpu_check_summary(),
        doc.image(f"{GPU}/gpu_kernel.png", "Triton kernels vs FlashAttention on an H200"),
        doc.source(dec, gpu_run_command(), f", [`{pre}`]({doc.link(pre)})")])


def gpu_check_summary() -> str:
    rel = f"{GPU}/gpu_check.json"
    c = load(rel)
    res = c["results"]
    ok = sum(1 for r in res.values() if r["ok"])
    f32 = [r["err"] for k, r in res.items() if "tol" in r and r["tol"] == 1e-3]
    bf16 = [r["err"] for k, r in res.items() if k.startswith("bf16")]
    graph = res["cuda-graph-replay"]["err"]
    replay = "is bit-identical to eager launches" if graph == 0 else f"differs from eager launches by {sci(graph)}"
    return (f"Correctness on the {c['device']} (`{rel}`): {ok} of {len(res)} checks pass; float32 cases within "
            f"{sci(max(f32))} of the float64 reference, bfloat16 within {max(bf16):.3f}; a replayed CUDA graph "
            f"{replay}.")


def gen_gpu_check(doc):
    rel = f"{GPU}/gpu_check.json"
    res = load(rel)["results"]
    rows = [[f"`{k}`", sci(r["err"]), r.get("tol", ""), "pass" if r["ok"] else "FAIL"] for k, r in res.items()]
    return "\n\n".join([gpu_check_summary(), table(["case", "max error", "tolerance", ""], rows),
                        doc.source(rel, gpu_run_command())])


def gen_gpu_tune(doc):
    rel = f"{GPU}/gpu_tune.json"
    t = load(rel)
    rows = [[r["mode"], tokens(r["n"]), r["warps"], r["stages"], r["block_n"], num(r["us"]), r["regs"], r["spills"]]
            for r in t["rows"]]
    best = "; ".join(f"{m}: {b['num_warps']} warps, {b['num_stages']} stages, key tiles of {b['BLOCK_N']}"
                     for m, b in t["best"].items())
    return "\n\n".join([table(["mode", "n", "warps", "stages", "key tile", "µs", "registers", "spills"], rows),
                        f"Fastest: {best}.", doc.source(rel, gpu_run_command())])


def gen_gpu_before_split(doc):
    rel, b64 = f"{GPU}/gpu_kernel_before_split.json", f"{GPU}/gpu_kernel_batch64_before_split.json"
    rows = []
    for (mode, n), k in sorted(gpu_rows(rel).items()):
        lam, fa = k["lambda"], k["sdpa-flash-gqa"]
        unit = "us" if mode == "decode" else "ms"
        rows.append([mode, tokens(n), load(rel)["meta"]["args"]["batch"] if mode == "decode" else 1,
                     f"{num(lam[unit], 1 if unit == 'us' else 2)} {unit.replace('us', 'µs')}",
                     f"{num(fa[unit], 1 if unit == 'us' else 2)} {unit.replace('us', 'µs')}"])
    for (mode, n), k in sorted(gpu_rows(b64).items()):
        rows.append([mode, tokens(n), k["lambda"]["batch"], f"{num(k['lambda']['us'])} µs",
                     f"{num(k['sdpa-flash-gqa']['us'])} µs"])
    m, m64 = load(rel)["meta"]["args"], load(b64)["meta"]["args"]
    return "\n\n".join([
        table(["mode", "n", "batch", "Λ (one launch)", "flash"], rows),
        doc.source(rel, command("benchmarks/gpu_kernel.py", m, rel),
                   " (at the earlier version of the kernels)"),
        doc.source(b64, command("benchmarks/gpu_kernel.py", m64, b64), " (likewise)")])


# --- scaling out: Ray across nodes, and what the bound buys per GPU ----------

# The paper model of docs/scaling.md. Measured inputs come from the results
# files; these are the assumptions, each printed under the table it shapes.
SCALING = {
    "model": "Llama-3.1-8B's shape: 32 layers, 8 KV heads of 128 (the H200 kernel run's KV shape), bfloat16",
    "layers": 32, "weights_gb": 16.06, "hbm_gb": 141.0, "memory_utilization": 0.9, "max_num_seqs": 256,
    "lengths": [32768, 131072, 262144, 1048576], "max_tp": 8,
}


def gen_ray_two_nodes(doc):
    rel = f"{RESULTS}/ray-two-nodes.json"
    r = load(rel)
    rows = [[w["rank"], w["node"], w["ray_node_id"][:12], ", ".join(a.rsplit(".", 1)[-1] for a in w["attention"]),
             "yes" if w["lminf_patches_applied"] else "no", w["kv_heads_per_layer"][0]] for w in r["workers"]]
    return "\n\n".join([
        table(["rank", "Ray node", "node id", "attention impl (in the worker)", "lminf patches applied",
               "KV heads per layer"], rows),
        f"{r['what'][0].upper()}{r['what'][1:]}. Executor: `{r['executor']}`. Model: {r['model']}; a {r['prompt_tokens']}-token prompt"
        + (f" ({r['prompt_tokens'] / r['rope_table']:.1f}x the RoPE table)" if r.get("rope_table") else "")
        + f", {r['max_tokens']} greedy tokens, lminf {lminf_settings(r['lminf'])}. "
        f"Tokens equal to TP=1: {'yes' if r['tokens_equal'] else 'NO'} ({len(r['tokens_tp2_two_nodes'])} of "
        f"{len(r['tokens_tp1'])}); vLLM {r['versions']['vllm']}, Ray {r['versions']['ray']}.",
        doc.source(rel, r["command"])])


def scaling_rows() -> tuple[list[list], dict]:
    s = SCALING
    decode = load(f"{GPU}/gpu_kernel_decode.json")
    a, meta = decode["meta"]["args"], decode["meta"]
    kv_heads, head, block = int(a["kv_heads"]), int(a["head_size"]), int(a["block_size"])
    G, W = int(a["global_tokens"]), int(a["local_tokens"])
    longest = max(r["n"] for r in decode["rows"])
    bw = {r["kernel"]: r["gbps"] * 1e9 for r in decode["rows"] if r["n"] == longest}
    per_layer_token = 2 * kv_heads * head * 2  # K and V, bfloat16
    per_token = s["layers"] * per_layer_token
    held_lminf = (-(-G // block) + -(-W // block) + 1) * block  # SPEC.md's bound, in tokens
    weights = s["weights_gb"] * 1e9
    copy_bw = meta["copy_gbps"] * 1e9

    def engine(n, tokens_held, tokens_read, attn_bw, tp):
        """Sequences admitted and decode tokens/s per GPU for one engine of `tp` GPUs."""
        budget = tp * (s["memory_utilization"] * s["hbm_gb"] * 1e9) - weights
        seqs = min(s["max_num_seqs"], int(budget // (tokens_held * per_token)))
        if seqs == 0:
            return 0, 0.0
        step = weights / tp / copy_bw + s["layers"] * seqs * tokens_read * per_layer_token / tp / attn_bw
        return seqs, seqs / step / tp

    rows = []
    for n in s["lengths"]:
        tp = next(t for t in (1, 2, 4, 8) if t == s["max_tp"] or engine(n, n, n, bw["sdpa-flash-gqa"], t)[0] > 0)
        stock_seqs, stock_tps = engine(n, n, n, bw["sdpa-flash-gqa"], tp)
        lminf_seqs, lminf_tps = engine(n, min(n, held_lminf), min(n, G + W), bw["lambda"], 1)
        rows.append([f"{n >> 20}M" if n >= 1 << 20 else tokens(n), num(n * per_token / tp / 2**30, 1), num(min(n, held_lminf) * per_token / 2**30, 2),
                     f"{stock_seqs / tp:g}" + (f" (TP={tp})" if tp > 1 else ""), lminf_seqs,
                     num(stock_tps, 0), num(lminf_tps, 0), ratio(lminf_tps / stock_tps) if stock_tps else "-"])
    facts = dict(G=G, W=W, block=block, held=held_lminf, per_token=per_token, longest=longest, bw=bw, copy_bw=copy_bw)
    return rows, facts


def gen_scaling_model(doc):
    s = SCALING
    rows, f = scaling_rows()
    kv = load(f"{RESULTS}/kv_memory.json")
    lminf_cpu = [r for r in kv["rows"] if r["backend"] == "lminf"]
    stock_cpu = [r for r in kv["rows"] if r["backend"] != "lminf"]
    ka = kv["args"]
    bound_cpu = -(-int(ka["global_tokens"]) // int(ka["block_size"])) + -(-int(ka["local_tokens"]) // int(ka["block_size"])) + 1
    decode_rel, kv_rel = f"{GPU}/gpu_kernel_decode.json", f"{RESULTS}/kv_memory.json"
    return "\n\n".join([
        table(["context", "KV per sequence per GPU, stock (GiB)", "lminf (GiB)", "sequences per GPU, stock",
               "lminf", "decode tokens/s per GPU, stock", "lminf", "lminf / stock"], rows),
        "Measured inputs: (1) the bound itself, on the real engine (CPU, "
        f"[`{kv_rel}`]({doc.link(kv_rel)})): lminf held {span([r['peak_blocks_decode'] for r in lminf_cpu if r['prompt_tokens'] > int(ka['local_tokens'])], str)} "
        f"blocks per decoding sequence from {tokens(min(r['prompt_tokens'] for r in lminf_cpu if r['prompt_tokens'] > int(ka['local_tokens'])))} "
        f"to {tokens(max(r['prompt_tokens'] for r in lminf_cpu))} tokens, the formula's ceil(G/B) + ceil(W/B) + 1 = "
        f"{bound_cpu}, while stock held {stock_cpu[-1]['peak_blocks_decode']} at "
        f"{tokens(stock_cpu[-1]['prompt_tokens'])}; (2) the H200 decode kernels "
        f"([`{decode_rel}`]({doc.link(decode_rel)})): the bandwidth each reached at "
        f"{tokens(f['longest'])} tokens, batch 8, {num(f['bw']['lambda'] / 1e9, 0)} GB/s for lminf's Λ kernel and "
        f"{num(f['bw']['sdpa-flash-gqa'] / 1e9, 0)} GB/s for FlashAttention on full context, and "
        f"{num(f['copy_bw'] / 1e9, 0)} GB/s for a plain copy (used for reading the weights).",
        f"Assumptions (not measured): {s['model']}, so {f['per_token'] // 1024} KiB of KV per token; "
        f"{s['weights_gb']:g} GB of weights; an H200's {s['hbm_gb']:g} GB at vLLM's memory utilization "
        f"{s['memory_utilization']:g}, all of it KV after the weights (activations ignored); at most "
        f"{s['max_num_seqs']} sequences per engine (vLLM's max_num_seqs); lminf G={f['G']}, W={f['W']} in blocks of "
        f"{f['block']}, so {f['held']} tokens held per sequence; decode is memory-bound: a step reads the weights "
        f"once and each sequence's KV (stock: all n tokens; lminf: G + W), at the measured bandwidths, assumed to "
        f"hold past {tokens(f['longest'])}; one engine per GPU (TP=1) unless stock needs more GPUs to hold one "
        f"sequence (the smallest TP up to {s['max_tp']} that does; its numbers are per GPU). Not modelled: prefill "
        "(stock's grows with n², lminf's with n·(G+W)), compute, scheduling, network; and what the answers are "
        "worth: past W, lminf is LM-Infinite's attention, not full attention.",
        doc.source(decode_rel, "python benchmarks/report.py", note=f" and [`{kv_rel}`]({doc.link(kv_rel)}), "
                   "through the model in `benchmarks/report.py` (`SCALING`)")])


GENERATORS = {
    "readme-quality": gen_readme_quality,
    "readme-speed": gen_readme_speed,
    "readme-memory": gen_readme_memory,
    "readme-gpu": gen_readme_gpu,
    "quality-tiny": gen_quality_tiny,
    "quality-smollm2-globals": gen_quality_smollm2_globals,
    "quality-smollm2-16k": gen_quality_smollm2_16k,
    "passkey": gen_passkey,
    "passkey-topk": gen_passkey_topk,
    "quality-tiny-topk-small": gen_quality_tiny_topk_small,
    "quality-topk-within-training": gen_quality_topk_within_training,
    "topk-speed": gen_topk_speed,
    "generation-tiny": gen_generation_tiny,
    "generation-smollm2": gen_generation_smollm2,
    "throughput-cpu": gen_throughput_cpu,
    "throughput-smollm2": gen_throughput_smollm2,
    "serve-speed": gen_serve_speed,
    "vllm-bench": gen_vllm_bench,
    "cpu-prefill": gen_cpu_prefill,
    "kv-memory": gen_kv_memory,
    "soak": gen_soak,
    "mixed-ttft": gen_mixed_ttft,
    "gpu-env": gen_gpu_env,
    "gpu-decode": gen_gpu_decode,
    "gpu-prefill": gen_gpu_prefill,
    "gpu-check": gen_gpu_check,
    "gpu-tune": gen_gpu_tune,
    "gpu-before-split": gen_gpu_before_split,
    "ray-two-nodes": gen_ray_two_nodes,
    "scaling-model": gen_scaling_model,
}


def render(path: Path, text: str, used: set) -> str:
    doc = Doc(path)

    def one(m: re.Match) -> str:
        name = m.group(2)
        if name not in GENERATORS:
            raise SystemExit(f"{path.relative_to(ROOT)}: no generator named {name!r} in benchmarks/report.py")
        used.add(name)
        return m.group(1) + GENERATORS[name](doc).strip() + "\n" + m.group(4)

    return BLOCK.sub(one, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if any block is out of date")
    args = p.parse_args(argv)
    used: set = set()
    stale = []
    for path in documents():
        old = path.read_text()
        opened = len(re.findall(r"<!-- generated:", old))
        if opened != len(BLOCK.findall(old)):
            print(f"{path.relative_to(ROOT)}: a generated block is not closed by its <!-- /generated:NAME -->")
            return 1
        new = render(path, old, used)
        if new == old:
            continue
        stale.append(path)
        if args.check:
            rel = str(path.relative_to(ROOT))
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel, rel + " (rendered)"))
        else:
            path.write_text(new)
            print(f"rewrote {path.relative_to(ROOT)}")
    unused = sorted(set(GENERATORS) - used)
    if unused:
        print(f"generators used by no document: {', '.join(unused)}")
        return 1
    if args.check and stale:
        print(f"out of date: {', '.join(str(p.relative_to(ROOT)) for p in stale)}; run `python benchmarks/report.py`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
