"""SPEC.md's parameter rules and model checks, on plain objects (no engine)."""

from types import SimpleNamespace

import pytest

from lminf_vllm.config import LminfConfig, LminfConfigError, parse_lminf_config, pretraining_length
from lminf_vllm.model_support import check_model_supported


def hf(**kw):
    base = dict(architectures=["LlamaForCausalLM"], max_position_embeddings=4096)
    base.update(kw)
    return SimpleNamespace(**base)


def test_defaults_follow_spec():
    assert parse_lminf_config(None, hf()) == LminfConfig(10, 4096, 4096)
    assert parse_lminf_config({"local_tokens": 512}, hf()) == LminfConfig(10, 512, 4096)


def test_cap_defaults_to_original_pretraining_length():
    config = hf(max_position_embeddings=131072, rope_scaling={"rope_type": "llama3", "original_max_position_embeddings": 8192})
    assert pretraining_length(config) == 8192
    assert parse_lminf_config({}, config).distance_cap == 8192


def test_sliding_window_baseline_and_ablation_cap_are_allowed():
    assert parse_lminf_config({"global_tokens": 0}, hf()).global_tokens == 0
    assert parse_lminf_config({"distance_cap": 10**9, "local_tokens": 64}, hf()).distance_cap == 10**9


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"global_tokens": -1}, r"global_tokens = -1 is invalid: it must be >= 0"),
        ({"local_tokens": 0}, r"local_tokens = 0 is invalid: it must satisfy 1 <= local_tokens <= distance_cap \(= 4096\)"),
        ({"local_tokens": 5000}, r"local_tokens = 5000 is invalid"),
        ({"local_tokens": 64, "distance_cap": 32}, r"1 <= local_tokens <= distance_cap \(= 32\)"),
        ({"distance_cap": 0}, r"distance_cap = 0 is invalid: it must be >= 1"),
        ({"global_tokens": "4"}, r"global_tokens = '4' is invalid: it must be an integer"),
        ({"global_tokens": True}, r"global_tokens = True is invalid"),
        ({"window": 4}, r"unknown key\(s\) 'window'"),
        ([1, 2], r"additional_config.lminf = \[1, 2\] is invalid: it must be an object"),
    ],
)
def test_bad_values_name_field_and_rule(raw, message):
    with pytest.raises(LminfConfigError, match=message):
        parse_lminf_config(raw, hf())


@pytest.mark.parametrize(
    "config, message",
    [
        (hf(architectures=["GPT2LMHeadModel"]), r"architecture \['GPT2LMHeadModel'\] is not supported"),
        (hf(architectures=["MistralForCausalLM"], sliding_window=4096), r"sliding_window=4096 is not supported"),
        (hf(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), r"rope_type='dynamic' is not supported"),
        (hf(rope_scaling={"rope_type": "longrope", "factor": 4.0}), r"rope_type='longrope' is not supported"),
        (hf(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5 is not handled"),
    ],
)
def test_models_lminf_cannot_serve_are_refused(config, message):
    with pytest.raises(LminfConfigError, match=message):
        check_model_supported(config)


def test_qwen2_with_window_switched_off_is_accepted():
    check_model_supported(hf(architectures=["Qwen2ForCausalLM"], sliding_window=4096, use_sliding_window=False))
