"""Scaled RoPE (llama3, linear on Llama; yarn on Qwen2) through the real engine, against HF's RoPE.

Each tiny model has a RoPE table of 128 rows and an original (pretraining)
length of 64 where the scaling has one. The default distance cap is the
max_model_len stock vLLM derives, 128 for all three; the checks state C = 64.
The reference (the transformers model with Λ-attention hooked in) takes its
frequencies from transformers, lminf from vLLM's rotary module: the checks
hold the two against each other too.
"""

import pytest
import torch

from family_checks import check_family
from lminf_vllm.config import LminfConfig, vllm_default_max_model_len
from lminf_vllm.testing.hf_reference import HFLambdaReference
from lminf_vllm.testing.tiny_models import build_llama

TABLE = 128
SCALINGS = {
    # every llama3 regime on head size 32: wavelengths < 16 kept, > 64 divided by 2, between blended
    "llama3": dict(max_position_embeddings=TABLE, rope_parameters=dict(
        rope_type="llama3", factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64, rope_theta=10000.0)),
    # vLLM's table is max_position_embeddings * factor rows, positions divided by the factor
    "linear": dict(max_position_embeddings=TABLE // 2, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)),
    # table original * factor rows; cos/sin scaled by mscale = 1 + 0.1 ln 2. On Qwen2
    # (q/k/v biases), the usual home of yarn, so both scaled-RoPE architectures run.
    "yarn": dict(max_position_embeddings=TABLE, architecture="qwen2", use_sliding_window=False, rope_parameters=dict(
        rope_type="yarn", factor=2.0, original_max_position_embeddings=64, rope_theta=10000.0)),
}


@pytest.fixture(scope="module", params=sorted(SCALINGS))
def scaled(request, tmp_path_factory):
    kind = request.param
    return kind, build_llama(tmp_path_factory.mktemp("models") / kind, seed=5, **SCALINGS[kind])


def test_default_cap_is_the_length_vllm_derives(scaled):
    from transformers import AutoConfig

    kind, model = scaled
    # llama3 and yarn: the table as stated; linear: 64 rows times its factor 2
    assert vllm_default_max_model_len(AutoConfig.from_pretrained(model)).value == TABLE


def test_scaled_rope_through_the_engine(scaled):
    kind, model = scaled
    reference = HFLambdaReference(model)
    if kind == "yarn":
        assert reference.rotary.attention_scaling > 1.05  # the mscale is really exercised
    worst = check_family(model, reference, TABLE, LminfConfig(4, 48, 64))
    for spec in worst["specs"]:  # vLLM's frequencies as lminf read them are HF's
        torch.testing.assert_close(spec.inv_freq, reference.rotary.inv_freq, rtol=1e-6, atol=0)
        assert spec.attention_scaling == pytest.approx(reference.rotary.attention_scaling, rel=1e-12)
    print(f"\n{kind}: max |lminf - stock| {worst['stock']:.1e}, |lminf - reference| prompt {worst['prompt']:.1e} decode {worst['decode']:.1e}, cap moves {worst['cap_effect']:.2f}")


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_a_misread_scaling_is_refused_at_start_up(kind):
    """The frequencies lminf reads must reproduce vLLM's own table, or the engine stops."""
    import dataclasses

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from lminf_vllm.config import LminfConfigError
    from lminf_vllm.runtime_patches.patch_model_loader_base_loader import check_spec_reproduces_table, rotary_spec_of

    rope_parameters = dict(SCALINGS[kind]["rope_parameters"])
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(32, SCALINGS[kind]["max_position_embeddings"], True, rope_parameters, torch.float32)
    spec = rotary_spec_of(rope)  # read right: accepted
    wrong = (
        dataclasses.replace(spec, inv_freq=spec.inv_freq * 2.0)  # the linear factor not folded in
        if kind == "linear"
        else dataclasses.replace(spec, attention_scaling=1.0)  # yarn's mscale forgotten
    )
    with pytest.raises(LminfConfigError, match="does not reproduce vLLM's cos/sin table"):
        check_spec_reproduces_table(wrong, rope.cos_sin_cache, type(rope).__name__)


def test_scaled_rope_table_equals_transformers_frequencies_worked_out_by_hand(scaled):
    """The cos/sin the engine forms past the stock table, against transformers' scaled
    frequencies (ROPE_INIT_FUNCTIONS) and cos/sin from Python's math: nothing from lminf_vllm.rope."""
    import math

    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine import engine, lminf_options, worker_model

    kind, model = scaled
    rows = 16 * TABLE
    stock_rows = SCALINGS[kind]["max_position_embeddings"] * (2 if kind == "linear" else 1)  # vLLM's own table
    g = torch.Generator().manual_seed(3)
    positions = sorted({stock_rows, stock_rows + 1, rows - 1, *torch.randint(stock_rows, rows, (32,), generator=g).tolist()})
    with engine(model, lminf=lminf_options(4, 48, 64), max_model_len=rows) as llm:
        rope = worker_model(llm).model.layers[0].self_attn.rotary_emb
        assert rope.cos_sin_cache.shape[0] == stock_rows  # no table grows with max_model_len
        table, _ = rope.step_cos_sin(torch.tensor(positions), torch.float32)  # what the step's rotary op reads
    table = table.double()
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](AutoConfig.from_pretrained(model), "cpu")
    freqs = [float(f) for f in inv_freq]
    expected = torch.tensor(
        [[math.cos(p * f) * scaling for f in freqs] + [math.sin(p * f) * scaling for f in freqs] for p in positions],
        dtype=torch.float64,
    )
    print(f"\n{kind}: max |rows - by hand| past the stock table {(table - expected).abs().max():.1e}")
    torch.testing.assert_close(table, expected, atol=1e-6, rtol=0)  # float32 rounding only
