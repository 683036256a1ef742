"""benchmarks/gpu_bundle.py without network: what it keeps of the vLLM wheel, how
it splits, the runs it prints, and that the recorded parts fit a device transfer."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_bundle  # noqa: E402


def test_keeps_the_fa3_llama_path_and_drops_the_rest():
    keep = gpu_bundle.keep
    assert keep("vllm/_C_stable_libtorch.abi3.so")
    assert keep("vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so")
    assert keep("vllm/vllm_flash_attn/flash_attn_interface.py")
    assert keep("vllm/third_party/pynvml.py")  # the CUDA platform's GPU detection
    assert keep("vllm-0.26.0.dist-info/entry_points.txt")
    for dropped in ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so",
                    "vllm/_flashmla_C.abi3.so", "vllm/_qutlass_C.abi3.so", "vllm/vllm-rs",
                    "vllm/third_party/deep_gemm/_C.cpython-312-x86_64-linux-gnu.so",
                    "vllm/v1/__pycache__/x.cpython-312.pyc"):  # fmt: skip
        assert not keep(dropped), dropped


def test_split_parts_join_back(tmp_path):
    archive = tmp_path / "a.tar.xz"
    data = bytes(range(256)) * 40
    archive.write_bytes(data)
    parts = gpu_bundle.split(archive, 1000)
    assert [p.stat().st_size for p in parts] == [1000] * 10 + [240]
    assert b"".join(p.read_bytes() for p in parts) == data
    runs = gpu_bundle.device_runs(parts, "build/gpu-bundle")
    assert len(runs) == len(parts)
    assert all(f"carry=['build/gpu-bundle/{p.name}']" in r for p, r in zip(parts, runs))
    assert "bash benchmarks/gpu_engine.sh" in runs[-1] and all("gpu_engine" not in r for r in runs[:-1])


def test_recorded_parts_fit_one_transfer_each():
    record = json.loads((REPO / "benchmarks" / "results" / "gpu-h200" / "bundle.json").read_text())
    assert record["vllm"] == "0.26.0"
    assert sum(p["bytes"] for p in record["parts"]) == record["archive_bytes"]
    for part in record["parts"]:
        assert part["bytes"] + record["project_bytes"] + gpu_bundle.MARGIN <= gpu_bundle.TRANSFER_LIMIT
    assert len(record["runs"]) == len(record["parts"])
