"""What the engine really runs: the backend class in the worker, the RoPE table."""

import torch
from vllm import SamplingParams

from conftest import TABLE
from engine import engine, lminf_options, random_prompt, worker_model
from lminf_vllm.rope import cos_sin_table, default_inv_freq


def _attention_impls(worker):
    """Runs inside the worker process: the class of every attention layer's impl."""
    from vllm.model_executor.layers.attention import Attention

    model = worker.model_runner.model
    return sorted({type(m.impl).__name__ for m in model.modules() if isinstance(m, Attention)})


def test_multiprocess_engine_runs_lminf_in_its_worker(tiny_llama, monkeypatch):
    """Engine core in a subprocess: the plugin loads there through its entry point."""
    prompt = random_prompt(150, seed=5)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    options = dict(lminf=lminf_options(4, 64, 96), max_model_len=1024)
    with engine(tiny_llama, **options) as llm:
        in_process = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with engine(tiny_llama, **options) as llm:
        assert llm.collective_rpc(_attention_impls) == [["LminfAttentionImpl"]]
        multi_process = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert list(multi_process.outputs[0].token_ids) == list(in_process.outputs[0].token_ids)


def test_rope_table_is_exact_past_max_position_embeddings(tiny_llama):
    # (until the block manager bounds KV per sequence, the pool must hold 100k tokens)
    with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=100_000, kv_cache_memory_bytes=160 << 20) as llm:
        rope = worker_model(llm).model.layers[0].self_attn.rotary_emb
        table = rope.cos_sin_cache
    assert table.shape[0] == 100_000
    expected = cos_sin_table(0, 100_000, default_inv_freq(10000.0, 32)).float()
    # past the table: float64 angles, exact to float32 rounding even at 1e5
    torch.testing.assert_close(table[TABLE:], expected[TABLE:], atol=1e-6, rtol=0)
    assert torch.isfinite(table).all()


def test_stock_rope_rows_are_untouched(tiny_llama):
    with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=4096) as llm:
        lminf_rows = worker_model(llm).model.layers[0].self_attn.rotary_emb.cos_sin_cache[:TABLE].clone()
    with engine(tiny_llama, backend="CPU_ATTN", max_model_len=TABLE) as llm:
        stock_rows = worker_model(llm).model.layers[0].self_attn.rotary_emb.cos_sin_cache
    assert stock_rows.shape[0] == TABLE
    assert torch.equal(lminf_rows, stock_rows)
