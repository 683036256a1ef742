"""SPEC.md's parameter rules and model checks, on plain objects (no engine but vLLM's own length rule)."""

from types import SimpleNamespace

import pytest

from lminf_vllm.config import (
    LminfConfig,
    LminfConfigError,
    check_topk_device,
    distance_cap_source,
    parse_lminf_config,
    vllm_default_max_model_len,
)
from lminf_vllm.model_support import check_model_supported


def hf(**kw):
    base = dict(architectures=["LlamaForCausalLM"], max_position_embeddings=4096)
    base.update(kw)
    return SimpleNamespace(**base)


def test_defaults_follow_spec():
    assert parse_lminf_config(None, hf()) == LminfConfig(10, 4096, 4096)
    assert parse_lminf_config({"local_tokens": 512}, hf()) == LminfConfig(10, 512, 4096)


# Configs in the shape of real checkpoints: the default C must be the max_model_len
# stock vLLM derives for each (SPEC.md), never the original (pre-scaling) length.
LLAMA31 = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=131072,
    rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192, rope_theta=500000.0),
)  # fmt: skip
QWEN25_YARN = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], max_position_embeddings=32768, use_sliding_window=False,
    rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768, rope_theta=1e6),
)  # fmt: skip
# YaRN whose config already states the stretched length (as Qwen3 and DeepSeek checkpoints do)
STRETCHED_YARN = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], max_position_embeddings=131072, use_sliding_window=False,
    rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768, rope_theta=1e6),
)  # fmt: skip
LINEAR = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=4096,
    rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
)  # fmt: skip
PLAIN = dict(model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=2048)
CASES = {"llama3.1": (LLAMA31, 131072), "qwen2.5-yarn": (QWEN25_YARN, 32768),
         "stretched-yarn": (STRETCHED_YARN, 131072), "linear": (LINEAR, 8192), "plain": (PLAIN, 2048)}  # fmt: skip


def vllm_derived_max_model_len(tmp_path, fields) -> tuple[int, object]:
    """vLLM's own answer: its ModelConfig on a checkpoint directory with this config, no max_model_len."""
    from transformers import AutoConfig
    from vllm.config import ModelConfig

    from lminf_vllm.testing.tiny_models import build_tokenizer

    build_tokenizer(tmp_path)
    fields = dict(fields)
    AutoConfig.for_model(
        fields.pop("model_type"), vocab_size=300, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
        num_hidden_layers=1, **fields,
    ).save_pretrained(tmp_path)  # fmt: skip
    model_config = ModelConfig(model=str(tmp_path))
    return model_config.max_model_len, model_config.hf_text_config


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_cap_is_what_stock_vllm_derives(tmp_path, name):
    fields, expected = CASES[name]
    vllm_len, hf_text_config = vllm_derived_max_model_len(tmp_path, fields)
    assert vllm_len == expected  # vLLM's rule, as read from its source
    derived = vllm_default_max_model_len(hf_text_config)  # the config object the engine hands lminf
    assert derived.value == vllm_len
    cfg = parse_lminf_config({"global_tokens": 4}, hf_text_config)
    assert cfg == LminfConfig(4, vllm_len, vllm_len)  # W defaults to C
    assert vllm_default_max_model_len(SimpleNamespace(**fields)).value == vllm_len  # plain objects too


def test_the_cap_source_is_said():
    config = SimpleNamespace(**LLAMA31)
    assert distance_cap_source({}, config) == (
        "default: the max_model_len stock vLLM derives for this model, max_position_embeddings=131072"
    )
    assert distance_cap_source({}, SimpleNamespace(**LINEAR)).endswith("max_position_embeddings=4096 x rope factor 2.0")
    assert distance_cap_source({"distance_cap": 8192}, config) == "set by additional_config.lminf.distance_cap"
    assert parse_lminf_config({"distance_cap": 8192}, config) == LminfConfig(10, 8192, 8192)  # the original: explicit


def test_vllms_length_rule_details():
    # the smallest length key wins; model_max_length overrides; a null factor counts as 1
    assert vllm_default_max_model_len(SimpleNamespace(max_position_embeddings=4096, seq_length=2048)).value == 2048
    assert vllm_default_max_model_len(SimpleNamespace(max_position_embeddings=4096, model_max_length=8192)).value == 8192
    nested = SimpleNamespace(max_position_embeddings=1000, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0}, "sliding_attention": {"rope_type": "default"}})
    assert vllm_default_max_model_len(nested).value == 4000
    null = SimpleNamespace(max_position_embeddings=1000, rope_parameters={"rope_type": "dynamic", "factor": None})
    assert vllm_default_max_model_len(null).value == 1000
    with pytest.raises(LminfConfigError, match=r"model config has none of max_position_embeddings, n_positions"):
        vllm_default_max_model_len(SimpleNamespace(architectures=["BloomForCausalLM"]))


def test_topk_blocks_defaults_to_off_and_takes_any_integer_from_zero():
    """docs/topk-contract.md: k is an integer >= 0, 0 (the default) is SPEC.md's Λ-mask."""
    assert parse_lminf_config(None, hf()).topk_blocks == 0
    assert parse_lminf_config({"global_tokens": 4}, hf()).topk_blocks == 0
    assert parse_lminf_config({"topk_blocks": 0}, hf()) == parse_lminf_config({}, hf())
    for k in (1, 4, 10**6):
        cfg = parse_lminf_config({"global_tokens": 4, "local_tokens": 64, "distance_cap": 96, "topk_blocks": k}, hf())
        assert cfg == LminfConfig(4, 64, 96, k)
    assert LminfConfig(4, 64, 96).topk_blocks == 0
    # the start-up line names k only when it is on
    assert "topk_blocks" not in LminfConfig(4, 64, 96).describe()
    assert LminfConfig(4, 64, 96, 3).describe().endswith(
        " topk_blocks=3 topk_score=mass topk_refresh=1 topk_store_max_bytes=none"
    )


def test_topk_store_max_bytes_defaults_to_no_cap_and_is_logged():
    """docs/topk-contract.md, "The store's size": host bytes per rank, >= 1, with top-k only."""
    assert parse_lminf_config({"topk_blocks": 4}, hf()).topk_store_max_bytes is None
    cfg = parse_lminf_config({"topk_blocks": 4, "topk_store_max_bytes": 1 << 30}, hf())
    assert cfg.topk_store_max_bytes == 1 << 30 and cfg.describe().endswith(" topk_store_max_bytes=1073741824")


@pytest.mark.parametrize("raw, message", [
    ({"topk_blocks": 4, "topk_store_max_bytes": 0}, r"topk_store_max_bytes = 0 is invalid: it must be an integer >= 1"),
    ({"topk_blocks": 4, "topk_store_max_bytes": "1G"}, r"topk_store_max_bytes = '1G' is invalid: it must be an integer"),
    ({"topk_store_max_bytes": 1 << 30}, r"topk_store_max_bytes = 1073741824 is invalid: .*needs topk_blocks > 0"),
])  # fmt: skip
def test_bad_topk_store_max_bytes_is_refused_naming_the_rule(raw, message):
    with pytest.raises(LminfConfigError, match=message):
        parse_lminf_config(raw, hf())


def test_topk_score_defaults_to_mass_and_takes_bound():
    """docs/topk-contract.md, "Scoring a middle block": the block's attention mass by default,
    Quest's bound on request."""
    assert parse_lminf_config({"topk_blocks": 4}, hf()).topk_score == "mass"
    assert LminfConfig(4, 64, 96, 3).topk_score == "mass"
    cfg = parse_lminf_config({"topk_blocks": 4, "topk_score": "bound"}, hf())
    assert cfg.topk_score == "bound" and cfg.describe().endswith(" topk_score=bound topk_refresh=1 topk_store_max_bytes=none")
    assert parse_lminf_config({"topk_score": "mass"}, hf()) == parse_lminf_config({}, hf())
    assert parse_lminf_config({"topk_blocks": 4, "topk_score": "mass_int8"}, hf()).topk_score == "mass_int8"


def test_topk_refresh_defaults_to_1_and_takes_any_integer_from_one():
    """docs/topk-contract.md, "Chunks, decode and prefill": a decode row keeps its request's last
    decode row's selection while that row is fewer than topk_refresh positions back; 1 scores at every row."""
    assert parse_lminf_config({"topk_blocks": 4}, hf()).topk_refresh == 1 == LminfConfig(4, 64, 96, 3).topk_refresh
    assert parse_lminf_config({"topk_blocks": 4, "topk_refresh": 16}, hf()).topk_refresh == 16
    assert parse_lminf_config({"topk_blocks": 4, "topk_refresh": 1}, hf()).topk_refresh == 1
    assert parse_lminf_config({"topk_blocks": 4, "topk_refresh": 1000}, hf()).topk_refresh == 1000


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
        ({"topk_blocks": -1}, r"additional_config\.lminf\.topk_blocks = -1 is invalid: it must be >= 0"),
        ({"topk_blocks": "2"}, r"additional_config\.lminf\.topk_blocks = '2' is invalid: it must be an integer"),
        ({"topk_blocks": 2.0}, r"additional_config\.lminf\.topk_blocks = 2\.0 is invalid: it must be an integer"),
        ({"topk_blocks": True}, r"additional_config\.lminf\.topk_blocks = True is invalid: it must be an integer"),
        ({"topk_blocks": None}, r"additional_config\.lminf\.topk_blocks = None is invalid: it must be an integer"),
        ({"topk": 2}, r"unknown key\(s\) 'topk': the known keys are .*, topk_blocks, topk_score"),
        ({"topk_score": "quest"},
         r"additional_config\.lminf\.topk_score = 'quest' is invalid: it must be one of 'mass', 'bound'"),
        ({"topk_score": None}, r"additional_config\.lminf\.topk_score = None is invalid: it must be one of"),
        ({"topk_score": ["mass"]}, r"additional_config\.lminf\.topk_score = \['mass'\] is invalid"),
        ({"topk_refresh": 0}, r"additional_config\.lminf\.topk_refresh = 0 is invalid: it must be >= 1"),
        ({"topk_refresh": 2.5}, r"additional_config\.lminf\.topk_refresh = 2\.5 is invalid: it must be an integer"),
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


def test_the_engine_parses_its_settings_once_and_hands_them_down(tiny_llama, monkeypatch):
    """VllmConfig's post-init parses once; later readers (KV spec, builder, layers,
    other processes through the pickled config) get the recorded result."""
    import pickle

    from vllm.engine.arg_utils import EngineArgs

    import lminf_vllm.vllm_config as vc

    user = {"lminf": {"global_tokens": 4}}
    args = EngineArgs(model=str(tiny_llama), attention_backend="lminf", additional_config=user,
                      max_model_len=1024, enforce_eager=True)  # fmt: skip
    config = args.create_engine_config()
    assert user == {"lminf": {"global_tokens": 4}}  # the user's dict is not written to
    monkeypatch.setattr(vc, "parse_lminf_config", lambda *a: pytest.fail("parsed a second time"))
    expected = LminfConfig(4, 128, 128)
    assert vc.lminf_config_from_vllm(config) == expected
    assert vc.lminf_config_from_vllm(pickle.loads(pickle.dumps(config))) == expected


def test_topk_blocks_is_refused_off_cpu():
    """The top-k path has only run on CPU: other devices are refused at start-up, by name."""
    check_topk_device(4, "cpu")
    check_topk_device(0, "cuda")  # Λ alone runs anywhere
    with pytest.raises(LminfConfigError, match=r"topk_blocks = 4 is not supported on device 'cuda' yet: .*CPU only"):
        check_topk_device(4, "cuda")
