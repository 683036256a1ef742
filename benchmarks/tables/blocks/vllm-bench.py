"""`vllm bench throughput` per backend: tokens/s against the first backend's at the same length,
and the rows a backend could not run."""

import re

from tables.commands import command
from tables.common import RESULTS, first_backend, load, num, ratio, table


def render(doc) -> str:
    rel = f"{RESULTS}/vllm-bench-throughput.json"
    t = load(rel)
    base_name = first_backend(t["args"])
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
