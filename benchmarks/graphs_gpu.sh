#!/usr/bin/env bash
# On the GPU machine: the cuda tests, then M47 scaled to 8 layers, eager vs CUDA-graph decode.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash tests/gpu/run_on_device.sh
cd /tmp
for g in "" "--no-cuda-graphs"; do
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 timeout 200 python3 -m hybridinfer.bench.decode \
    --shape M47 --layers 8 --threads 8 --tokens 12 --warmup 3 --prefill 0 --vram-budget 24GiB 8GiB \
    --policies hybrid dense-offload gpu-dense gpu-sparse $g --json "$OUT/decode_M47x8${g:+_eager}.json" 2>&1 \
    | grep -v USDT | tee "$OUT/decode_M47x8${g:+_eager}.log"
done
