"""Length generalization through the real engine, on the committed tiny RoPE model.

A fast version of `python benchmarks/quality.py`: two held-out documents (of
the pinned sample in benchmarks/data/, so the numbers do not move with the
Python that runs them) of 4,096 bytes (16x the model's 256-token training length), stock attention vs
LM-Infinite with and without the distance cap. "1x" is the model on the same
tokens with at most its training length of context (the segments mode).
"""

import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import corpus  # noqa: E402
import quality  # noqa: E402

L = 256
LENGTHS = [L, 2 * L, 4 * L, 8 * L, 16 * L]


@pytest.fixture(scope="module")
def tiny_rope_result():
    assert quality.training_length(quality.TINY_MODEL) == L
    return quality.run(
        quality.TINY_MODEL, LENGTHS, ["segments", "stock", "lminf", "nocap"], docs=2,
        global_tokens=10, local_tokens=L, distance_cap=L, kv_cache_bytes=256 << 20,
    )  # fmt: skip


def test_the_result_names_the_pinned_documents_it_read(tiny_rope_result):
    assert tiny_rope_result["corpus"]["name"] == "cpython-3.11.7-heldout"
    assert tiny_rope_result["documents"] == ["pydoc.py", "doctest.py"]  # the two longest
    assert set(tiny_rope_result["documents"]) <= set(tiny_rope_result["corpus"]["sha256"])


def test_the_pinned_sample_is_held_out_and_checked(tmp_path, monkeypatch):
    docs = corpus.pinned_documents()
    assert len(docs) == 4 and all(corpus.is_held_out(name) for name, _ in docs)  # never trained on
    assert "class HTTPServer(socketserver.TCPServer)" in dict(docs)["http/server.py"]
    copy = tmp_path / corpus.PINNED.name
    shutil.copytree(corpus.PINNED, copy)
    (copy / "pydoc.py.txt").write_text((copy / "pydoc.py.txt").read_text().replace("def ", "def  ", 1))
    monkeypatch.setattr(corpus, "PINNED", copy)
    with pytest.raises(RuntimeError, match="pydoc.py.txt changed"):
        corpus.pinned_documents()


def test_stock_attention_collapses_past_the_training_length(tiny_rope_result):
    ppl, at_1x = (tiny_rope_result["modes"][m]["ppl"] for m in ("stock", "segments"))
    assert ppl[16 * L] >= 2 * at_1x[16 * L], (ppl, at_1x)


def test_lminf_keeps_its_perplexity_at_16x_the_training_length(tiny_rope_result):
    ppl, at_1x = (tiny_rope_result["modes"][m]["ppl"] for m in ("lminf", "segments"))
    assert abs(ppl[16 * L] / at_1x[16 * L] - 1) <= 0.15, (ppl, at_1x)
    # At every length it stays far from the collapse (stock is 3-7x worse there).
    stock = tiny_rope_result["modes"]["stock"]["ppl"]
    for n in LENGTHS[2:]:
        assert ppl[n] < 0.5 * stock[n], (n, ppl, stock)


def test_the_distance_cap_helps_past_2x(tiny_rope_result):
    cap, nocap = tiny_rope_result["modes"]["lminf"]["ppl"], tiny_rope_result["modes"]["nocap"]["ppl"]
    for n in LENGTHS[2:]:
        assert nocap[n] > 1.01 * cap[n], (n, cap, nocap)


def test_at_the_training_length_all_modes_agree(tiny_rope_result):
    # n <= W: LM-Infinite is full attention, so the first column is the same number.
    first = {m: r["ppl"][L] for m, r in tiny_rope_result["modes"].items()}
    assert max(first.values()) - min(first.values()) < 1e-3 * first["stock"], first


def test_smollm2_needs_its_global_tokens_with_a_small_window():
    """The default model with W=256: dropping the first tokens (G=0) hurts far
    more than what the window itself loses (the paper's Table 4 in small)."""
    from lminf_vllm.prepare_model import DEFAULT_OUT

    if not (DEFAULT_OUT / "config.json").exists():
        pytest.skip("SmolLM2 not prepared (make model)")
    result = quality.run(
        DEFAULT_OUT, [512, 1024], ["window", "lminf"], docs=2,
        global_tokens=4, local_tokens=256, distance_cap=8192, kv_cache_bytes=512 << 20,
    )  # fmt: skip
    window, with_globals = (result["modes"][m]["ppl"][1024] for m in ("window", "lminf"))
    assert window >= 1.3 * with_globals, (window, with_globals)
