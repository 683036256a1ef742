"""`dtype="auto"` on CPU: an lminf engine runs in what the CPU computes natively.

The configs are vLLM's own (EngineArgs.create_model_config, as `vllm serve` and
`vllm.LLM` build them); only the CPU's answer to "bfloat16 instructions?" is
set by the test, so both kinds of CPU are checked on whichever one CI has.
"""

import pytest
import torch
from vllm.engine.arg_utils import EngineArgs

from helpers import logged
from lminf_vllm import cpu_isa


def model_dtype(model, native: bool, monkeypatch, **kwargs) -> torch.dtype:
    monkeypatch.setattr(cpu_isa, "native_bfloat16", lambda: native)
    args = EngineArgs(model=str(model), max_model_len=128, **kwargs)
    config = args.create_model_config()
    assert args.dtype == kwargs.get("dtype", "auto")  # the user's arguments are left as given
    return config.dtype


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    """The tiny model with a bfloat16 config, as SmolLM2 and most checkpoints ship."""
    from lminf_vllm.testing.tiny_models import build_llama

    return build_llama(tmp_path_factory.mktemp("models") / "bf16-llama", torch_dtype="bfloat16")


def test_auto_is_float32_without_bfloat16_instructions(bf16_llama, monkeypatch):
    with logged() as messages:
        assert model_dtype(bf16_llama, False, monkeypatch, attention_backend="lminf") == torch.float32
    line = next(m for m in messages if "dtype auto" in m)
    assert "float32" in line and "no bfloat16 instructions" in line and "--dtype bfloat16" in line


def test_auto_keeps_vllms_bfloat16_where_the_cpu_has_it(bf16_llama, monkeypatch):
    with logged() as messages:
        assert model_dtype(bf16_llama, True, monkeypatch, attention_backend="lminf") == torch.bfloat16
    assert any("dtype auto -> bfloat16" in m for m in messages)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_an_explicit_dtype_is_kept(bf16_llama, monkeypatch, dtype):
    got = model_dtype(bf16_llama, False, monkeypatch, attention_backend="lminf", dtype=dtype)
    assert got == getattr(torch, dtype)


def test_stock_engines_keep_vllms_choice(bf16_llama, monkeypatch):
    assert model_dtype(bf16_llama, False, monkeypatch) == torch.bfloat16


def test_this_cpus_answer_matches_torchs_capability_report():
    """The rule reads torch's own checks (the ones vLLM picks its CPU kernels by), not model names."""
    described = cpu_isa.describe()
    if described["machine"] == "x86_64":
        native = described["torch_capability"].startswith("AVX512") and (described["avx512_bf16"] or described["amx"])
        assert cpu_isa.native_bfloat16() == native
        assert described["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert described["cores"] >= 1 and described["torch"] == torch.__version__


def test_a_cpu_capped_to_avx2_gets_float32():
    """ATEN_CPU_CAPABILITY=avx2 (how benchmarks/cpu_dtype.py stands in for an AVX2-only CPU) lowers
    torch's dispatch, and the rule follows it: no native bfloat16 there."""
    import os
    import subprocess
    import sys

    probe = "from lminf_vllm import cpu_isa; import torch; print(cpu_isa.auto_dtype(torch.bfloat16)[0])"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.float32"
