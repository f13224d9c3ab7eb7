#!/usr/bin/env bash
# Issue 6 on the GPU machine (device tool): M47 q4_0, 8 threads, budgets 8/16/24 GiB, every policy.
# Usage there, from the repository root:  bash benchmarks/decode_gpu.sh   (writes to $OUT)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
cd /tmp && PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 timeout "${LIMIT:-470}" python3 -m hybridinfer.bench.decode \
  --shape M47 --threads 8 --tokens 12 --warmup 3 --vram-budget 8GiB 16GiB 24GiB --prefill 512 \
  --prefill-only gpu-dense gpu-sparse hybrid@24GiB dense-offload@24GiB \
  --json "$OUT/decode_M47_gpu.json" --plot "$OUT/decode_M47_gpu.png" 2>&1 | grep -v USDT | tee "$OUT/decode_M47_gpu.log"
