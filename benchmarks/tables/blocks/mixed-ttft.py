"""Mixed traffic's time to first token: one row per server variant, a before/after sentence, and
the exact server and client commands each run recorded."""

import ast
import shlex

from tables.commands import command
from tables.common import RESULTS, home, load, num, table


def row(r: dict) -> list:
    s, cap = r["short"], r["long_prefill_token_threshold"]
    uncapped = cap >= r["max_num_batched_tokens"]
    default = "" if r["server_extra_args"] else " (lminf's default)"
    what = "vLLM's uncapped chunks" if uncapped else f"cap {cap}{default}"
    return [f"{r['name']}: {what}",
            r["max_num_batched_tokens"], num(r["long"]["ttft_ms"] / 1000),
            f"{s['sent_during_prefill']} of {s['completed']}",
            num(s["mean_ttft_ms"] / 1000, 2), num(s["median_ttft_ms"] / 1000, 2),
            num(s["p99_ttft_ms"] / 1000, 2), num(s["mean_tpot_ms"], 0), num(s["mean_e2el_ms"] / 1000)]


def before_after(runs: list) -> str:
    by_name = {r["name"]: r for r in runs}
    if "before" not in by_name or "after" not in by_name:
        return ""
    b, f = by_name["before"], by_name["after"]
    return (f"Before and after, in one invocation: the short requests' mean time to first token "
            f"{num(b['short']['mean_ttft_ms'] / 1000)} s -> {num(f['short']['mean_ttft_ms'] / 1000)} s "
            f"(p99 {num(b['short']['p99_ttft_ms'] / 1000)} s -> {num(f['short']['p99_ttft_ms'] / 1000)} s); "
            f"the long prompt's {num(b['long']['ttft_ms'] / 1000)} s -> {num(f['long']['ttft_ms'] / 1000)} s.")


def render(doc) -> str:
    rel = f"{RESULTS}/mixed-ttft.json"
    m = load(rel)
    runs = m["runs"]
    a = m["args"]
    first = runs[0]
    cmd = command("benchmarks/mixed_ttft.py", {k: v for k, v in a.items() if k != "variant"}, rel)
    for spec in ast.literal_eval(a.get("variant", "[]")):  # repeated --variant, each quoted
        cmd = cmd.replace(" --out ", f" --variant '{spec}' --out ", 1)
    base = first["server_command"].split(" --port PORT")[0] + " --port PORT"
    loads = ", ".join(f"{r['name']} {r['load_average_1min'][0]:.1f}-{r['load_average_1min'][1]:.1f}" for r in runs)
    return "\n\n".join([
        table(["server", "step budget", "long prompt's TTFT s", "short requests sent during its prefill",
               "short TTFT mean s", "median s", "p99 s", "short TPOT ms", "short latency s"], [row(r) for r in runs]),
        before_after(runs),
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
