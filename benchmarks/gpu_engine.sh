#!/usr/bin/env bash
# The last of the device runs that benchmarks/gpu_bundle.py prints: unpack the
# bundle parts the earlier runs left in /tmp/bundle, make vLLM 0.26.0, its
# missing dependencies and this plugin importable without network, and run
# benchmarks/gpu_engine.py (about 8 minutes). JSON and the log go to $OUT.
#     mv build/gpu-bundle/lminf-gpu-bundle.tar.xz.partN /tmp/bundle/ && bash benchmarks/gpu_engine.sh
# A warm machine keeps /tmp/bundle/ between calls: a rerun skips the unpacking.
set -u
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-/tmp/bundle}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_engine.log") 2>&1

if [ ! -d "$BUNDLE/vllm/vllm" ]; then
  parts=$(ls "$BUNDLE"/lminf-gpu-bundle.tar.xz.part* | sort -V)
  echo "parts: $parts"
  cat $parts > /tmp/lminf-gpu-bundle.tar.xz
  expected=$($PY -c "import json; print(json.load(open('$REPO/benchmarks/results/gpu-h200/bundle.json'))['archive_sha256'])")
  actual=$(sha256sum /tmp/lminf-gpu-bundle.tar.xz | cut -d' ' -f1)
  if [ "$expected" != "$actual" ]; then
    echo "bundle checksum mismatch: expected $expected, got $actual (a part missing or from another build)"
    exit 3
  fi
  tar -xJf /tmp/lminf-gpu-bundle.tar.xz -C "$(dirname "$BUNDLE")" && rm /tmp/lminf-gpu-bundle.tar.xz
fi

# vLLM first, then the dependencies the image lacks, then the plugin's entry
# point (boot/lminf_vllm-0.0.0.dist-info: vllm.general_plugins -> lminf_vllm:register)
# and the project itself.
export PYTHONPATH="$BUNDLE/vllm:$BUNDLE/deps:$BUNDLE/boot:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-/tmp/vllm-cache}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  ldd --version | head -1
  $PY - <<'EOF'
import sys, torch
from importlib.metadata import entry_points, version
import vllm
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("vllm", vllm.__version__, vllm.__file__, "dist", version("vllm"))
print("plugins", [e.value for e in entry_points(group="vllm.general_plugins")])
EOF
} 2>&1 | tee "$OUT/env.txt"

# Extra arguments go to gpu_engine.py, e.g. a rerun of some sections while the
# machine is still warm: bash benchmarks/gpu_engine.sh --only throughput:lminf
timeout -k 10 520 $PY "$REPO/benchmarks/gpu_engine.py" --out "$OUT/engine.json" "$@"
echo "gpu_engine.py exit status $?"
