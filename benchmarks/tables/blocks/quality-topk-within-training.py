"""Top-k against Λ in settings where a query attends no more keys than the model was trained with;
how many it attends comes from lminf_vllm's own formula (pure Python, no vLLM)."""

from tables.common import RESULTS, load
from tables.quality import topk_ratio_table


def topk_against_lambda(doc, rel: str) -> str:
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


def render(doc) -> str:
    return "\n\n".join(topk_against_lambda(doc, f"{RESULTS}/{name}.json")
                       for name in ("quality-smollm2-topk-w2048", "quality-tiny-rope-L256-topk-w128"))
