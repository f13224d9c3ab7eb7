#!/usr/bin/env bash
# Issue 6 on the GPU machine (device tool): M47 q4_0, 8 threads, every policy, in two processes
# (one run of everything takes more than the device's 10-minute call since the routing is real):
#   bash benchmarks/decode_gpu.sh budgets   # hybrid and dense offload at 8/16/24 GiB (+ the plot)
#   bash benchmarks/decode_gpu.sh bounds    # gpu-sparse, gpu-dense, cpu-sparse, cpu-dense
# from the repository root; writes decode_M47_gpu_<part>.{json,log[,png]} to $OUT.
set -o pipefail
PART=${1:-budgets}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "$PART" in
  budgets) ARGS="--vram-budget 8GiB 16GiB 24GiB --policies hybrid dense-offload
                 --prefill-only hybrid@24GiB dense-offload@24GiB --plot $OUT/decode_M47_gpu_budgets.png" ;;
  bounds)  ARGS="--policies gpu-sparse gpu-dense cpu-sparse cpu-dense --prefill-only gpu-dense gpu-sparse" ;;
  *) echo "usage: $0 budgets|bounds" >&2; exit 2 ;;
esac
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
CMD="python3 -m hybridinfer.bench.decode --shape M47 --threads 8 --tokens 12 --warmup 3 --prefill 512 $ARGS --json $OUT/decode_M47_gpu_$PART.json"
echo "# $CMD" > "$OUT/decode_M47_gpu_$PART.log"
cd /tmp && PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 timeout "${LIMIT:-560}" $CMD 2>&1 \
  | grep -v USDT | tee -a "$OUT/decode_M47_gpu_$PART.log"
