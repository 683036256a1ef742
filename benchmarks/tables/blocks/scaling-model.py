"""docs/scaling.md's paper model: what the bound buys per H200, from the measured H200 decode
bandwidths and CPU block counts plus the assumptions in SCALING (printed under the table)."""

from tables.common import GPU, RESULTS, load, num, ratio, span, table, tokens

# The paper model. Measured inputs come from the results files; these are the
# assumptions, each printed under the table it shapes.
SCALING = {
    "model": "Llama-3.1-8B's shape: 32 layers, 8 KV heads of 128 (the H200 kernel run's KV shape), bfloat16",
    "layers": 32, "weights_gb": 16.06, "hbm_gb": 141.0, "memory_utilization": 0.9, "max_num_seqs": 256,
    "lengths": [32768, 131072, 262144, 1048576], "max_tp": 8,
}


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


def render(doc) -> str:
    s = SCALING
    rows, f = scaling_rows()
    kv = load(f"{RESULTS}/kv_memory.json")
    lminf_cpu = [r for r in kv["rows"] if r["backend"] == "lminf"]
    stock_cpu = [r for r in kv["rows"] if r["backend"] != "lminf"]
    ka = kv["args"]
    bound_cpu = -(-int(ka["global_tokens"]) // int(ka["block_size"])) + -(-int(ka["local_tokens"]) // int(ka["block_size"])) + 1
    past_w = [r for r in lminf_cpu if r["prompt_tokens"] > int(ka["local_tokens"])]
    decode_rel, kv_rel = f"{GPU}/gpu_kernel_decode.json", f"{RESULTS}/kv_memory.json"
    return "\n\n".join([
        table(["context", "KV per sequence per GPU, stock (GiB)", "lminf (GiB)", "sequences per GPU, stock",
               "lminf", "decode tokens/s per GPU, stock", "lminf", "lminf / stock"], rows),
        "Measured inputs: (1) the bound itself, on the real engine (CPU, "
        f"[`{kv_rel}`]({doc.link(kv_rel)})): lminf held {span([r['peak_blocks_decode'] for r in past_w], str)} "
        f"blocks per decoding sequence from {tokens(min(r['prompt_tokens'] for r in past_w))} "
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
                   "through the model in `benchmarks/tables/blocks/scaling-model.py` (`SCALING`)")])
