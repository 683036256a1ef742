"""vLLM's Ray executor over two nodes: what each worker reported from its own process."""

from tables.common import RESULTS, lminf_settings, load, table


def render(doc) -> str:
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
