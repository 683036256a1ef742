#!/usr/bin/env bash
# Everything this project checks on one CUDA GPU, in one go (about 5 minutes):
# versions, the kernel's correctness (benchmarks/gpu_check.py), a launch
# parameter sweep (benchmarks/gpu_tune.py), then timings against full attention
# with the best settings (benchmarks/gpu_kernel.py). Needs torch and triton,
# not vLLM. Logs and JSON go to $OUT (default out/gpu).
#     bash benchmarks/gpu_run.sh
set -u
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"
timeout 110 $PY benchmarks/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
timeout 60 $PY benchmarks/gpu_tune.py --n 16384 --warps 4 8 --stages 3 --block-n 16 32 64 \
  --out "$OUT/gpu_tune.json" 2>&1 | grep -v -i warn | tee "$OUT/gpu_tune.log"
best() { $PY -c "import json,sys; print(json.dumps(json.load(open('$OUT/gpu_tune.json'))['best'].get('$1', {})))" 2>/dev/null || echo '{}'; }
for mode in decode prefill; do
  LMINF_TRITON_TUNING=$(best $mode) timeout 55 $PY benchmarks/gpu_kernel.py --modes $mode \
    --lengths 4096 16384 65536 131072 --batch 8 --out "$OUT/gpu_kernel_$mode.json" 2>&1 | tee "$OUT/gpu_kernel_$mode.log"
done
