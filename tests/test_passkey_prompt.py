"""The passkey prompt of benchmarks/passkey.py: length and needle depth as asked."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import passkey  # noqa: E402


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from lminf_vllm.prepare_model import DEFAULT_OUT

    if not (DEFAULT_OUT / "tokenizer.json").exists():
        pytest.skip("SmolLM2 not prepared (make model)")
    return AutoTokenizer.from_pretrained(DEFAULT_OUT)


@pytest.mark.parametrize("n", [1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_has_the_length_and_the_needle_where_asked(smollm2_tokenizer, n, depth):
    ids = passkey.build_prompt(smollm2_tokenizer, n, depth, key=48213)
    filler = len(smollm2_tokenizer(passkey.FILLER, add_special_tokens=False)["input_ids"])
    assert n - filler < len(ids) <= n
    text = smollm2_tokenizer.decode(ids)
    assert text.count("48213") == 2 and text.endswith(passkey.QUESTION)
    at = text.index("The pass key is 48213") / len(text)
    assert abs(at - depth) < 0.05
