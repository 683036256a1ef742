"""Each class of bad configuration stops the engine at start with a clear message."""

import json
import re
import shutil

import pytest

from engine import engine, lminf_options


def variant(tiny_llama, tmp_path, name, **config_changes):
    """A copy of the tiny model's config and tokenizer with some config fields changed."""
    out = tmp_path / name
    out.mkdir()
    for f in tiny_llama.iterdir():
        if f.name != "model.safetensors":  # start-up checks fail before weights load
            shutil.copy(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "options, message",
    [
        (lminf_options(global_tokens=-1), r"additional_config.lminf.global_tokens = -1 is invalid: it must be >= 0"),
        (lminf_options(local_tokens=200), r"local_tokens = 200 is invalid: it must satisfy 1 <= local_tokens <= distance_cap \(= 128\)"),
        (lminf_options(local_tokens=0), r"local_tokens = 0 is invalid"),
        ({"lminf": {"global_tokens": 4, "windw": 8}}, r"additional_config.lminf has unknown key\(s\) 'windw'"),
        ({"lminf": {"global_tokens": 4.5}}, r"global_tokens = 4.5 is invalid: it must be an integer"),
    ],
    ids=["negative-G", "W-above-C", "W-zero", "unknown-key", "non-integer"],
)
def test_bad_lminf_config_is_refused(tiny_llama, options, message):
    with pytest.raises(Exception, match=message):
        with engine(tiny_llama, lminf=options, max_model_len=256):
            pass


def test_model_with_its_own_sliding_window_is_refused(tiny_llama, tmp_path):
    model = variant(
        tiny_llama, tmp_path, "mistral-swa", architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64
    )
    with pytest.raises(Exception, match=r"model sliding_window=64 is not supported by lminf"):
        with engine(model, max_model_len=256):
            pass


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, r"rope_type='dynamic' is not supported by lminf: its frequencies depend on the sequence length"),
        (
            {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16, "original_max_position_embeddings": 64},
            r"rope_type='longrope' is not supported by lminf: it switches between two frequency sets",
        ),
        ({"rope_type": "default", "mrope_section": [4, 6, 6]}, r"multimodal M-RoPE \(3-D positions\) is not supported by lminf"),
    ],
    ids=["dynamic", "longrope", "mrope"],
)
def test_unhandled_rope_variant_is_refused(tiny_llama, tmp_path, rope, message):
    rope = dict(rope, rope_theta=10000.0)
    model = variant(tiny_llama, tmp_path, rope["rope_type"], rope_scaling=rope, rope_parameters=rope)
    with pytest.raises(Exception, match=message):
        with engine(model, max_model_len=256):
            pass


def test_model_without_rope_is_refused(tmp_path):
    from transformers import AutoConfig

    from lminf_vllm.testing.tiny_models import build_tokenizer

    out = tmp_path / "gpt2"
    out.mkdir()
    build_tokenizer(out)
    AutoConfig.for_model(
        "gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_layer=1, n_head=2, vocab_size=300, n_positions=128
    ).save_pretrained(out)
    with pytest.raises(Exception, match=r"architecture \['GPT2LMHeadModel'\] is not supported by lminf"):
        with engine(out, max_model_len=128):
            pass


def test_stock_backend_keeps_vllms_length_check(tiny_llama):
    """lminf lifts the max_model_len limit for itself only."""
    with pytest.raises(Exception, match=r"max_model_len \(1024\) is greater than the derived max_model_len"):
        with engine(tiny_llama, backend="CPU_ATTN", max_model_len=1024):
            pass


def test_quantized_kv_cache_is_refused(tiny_llama):
    with pytest.raises(Exception, match=r"kv_cache_dtype='fp8' is not supported by lminf yet"):
        with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=256, kv_cache_dtype="fp8"):
            pass


def config_only(tmp_path, model_type, **fields):
    """A model directory with a tokenizer and a config, no weights (refused before loading)."""
    from transformers import AutoConfig

    from lminf_vllm.testing.tiny_models import build_tokenizer

    out = tmp_path / model_type
    out.mkdir()
    build_tokenizer(out)
    AutoConfig.for_model(model_type, vocab_size=300, **fields).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "model_type, fields, message",
    [
        (
            "falcon",
            dict(architectures=["FalconForCausalLM"], hidden_size=64, num_hidden_layers=1, num_attention_heads=2, alibi=True),
            r"\['FalconForCausalLM'\] uses ALiBi position biases, which lminf supports on BloomForCausalLM only",
        ),
        (
            "bloom",
            dict(architectures=["BloomForCausalLM"], hidden_size=64, n_layer=1, n_head=2),
            r"model config has none of max_position_embeddings, .*: lminf cannot derive distance_cap \(stock vLLM would assume 2048\); set additional_config.lminf.distance_cap",
        ),
        (
            "gpt_neox",
            dict(architectures=["GPTNeoXForCausalLM"], hidden_size=128, num_attention_heads=4, num_hidden_layers=1,
                 max_position_embeddings=128, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)),
            r"rope_type='linear' on \['GPTNeoXForCausalLM'\] is not supported by lminf yet: scaled RoPE is checked on",
        ),
        (
            "llama",
            dict(architectures=["LlamaForCausalLM"], hidden_size=128, num_attention_heads=4, num_hidden_layers=1,
                 max_position_embeddings=128, rope_parameters=dict(rope_type="default", partial_rotary_factor=0.5, rope_theta=10000.0)),
            r"partial_rotary_factor=0.5 is not handled by lminf yet: only full-width rotary embeddings are supported for \['LlamaForCausalLM'\]",
        ),
    ],
    ids=["alibi-falcon", "bloom-without-cap", "scaled-rope-on-neox", "partial-rope-on-llama"],
)
def test_unproven_position_encoding_is_refused(tmp_path, model_type, fields, message):
    model = config_only(tmp_path, model_type, **fields)
    with pytest.raises(Exception, match=message):
        with engine(model, lminf=lminf_options(global_tokens=4), max_model_len=128):
            pass


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}),
            r"speculative decoding \(speculative_config, method='ngram'\) is not supported by lminf: .*",
        ),
        (
            dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
            r"KV connectors \(kv_transfer_config, kv_connector='ExampleConnector': prefill/decode "
            r"disaggregation, KV offloading\) are not supported by lminf: .*",
        ),
        (  # vLLM turns this into its OffloadingConnector
            dict(kv_offloading_size=0.01),
            r"KV connectors \(kv_transfer_config, kv_connector='OffloadingConnector'.*\) are not supported by lminf: .*",
        ),
        (
            dict(kv_events_config={"enable_kv_cache_events": True, "publisher": "null"}),
            r"KV cache events \(kv_events_config.enable_kv_cache_events=True\) are not supported by lminf: .*",
        ),
    ],
    ids=["speculative-ngram", "kv-connector", "kv-offloading", "kv-events"],
)
def test_vllm_features_lminf_cannot_serve_are_refused_in_one_line(tiny_llama, options, message):
    from lminf_vllm.cli import lminf_config_error

    with pytest.raises(Exception) as caught:
        with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=256, **options):
            pass
    line = lminf_config_error(caught.value)  # what `lminf-vllm serve` prints
    assert line is not None and "\n" not in line, caught.value
    assert re.fullmatch(message, line), line


def test_kv_events_switched_off_are_accepted(tiny_llama):
    with engine(tiny_llama, lminf=lminf_options(4, 64), max_model_len=256,
                kv_events_config={"enable_kv_cache_events": False}) as llm:  # fmt: skip
        assert llm.generate([{"prompt_token_ids": [1, 2, 3]}], use_tqdm=False)[0].outputs[0].token_ids


def test_start_up_log_explains_long_lengths_and_the_kv_bound_not_vllms_nan_warning(tiny_llama):
    """vLLM warns that positions past the table 'lead to nan' (stock RoPE); under
    lminf that is untrue, so the plugin says why the length is fine instead, and
    what one sequence can hold. Read from the log of a fresh process, as a user sees it."""
    import subprocess
    import sys

    script = (
        "from vllm import LLM\n"
        f"LLM(model={str(tiny_llama)!r}, attention_backend='lminf', additional_config={{'lminf': {{'global_tokens': 4}}}},"
        " max_model_len=4096, block_size=32, enforce_eager=True, kv_cache_memory_bytes=64 << 20)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used" not in log
    assert "max_model_len=4096 is past the model's own positions: fine with lminf" in log
    # what a sequence holds: ceil(4/32) + ceil(128/32) + 1 = 6 blocks of 32 while decoding
    assert "lminf KV bound: a sequence of any length holds at most 6 blocks while decoding" in log
