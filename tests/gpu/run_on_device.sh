#!/usr/bin/env bash
# On the GPU machine (device tool), from the repository root: build, then run every test that
# has a cuda variant (the hybrid equalities and the Triton kernels, compiled for the GPU), and
# write the log to $OUT (record it in tests/gpu/RESULTS.md).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_tests.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_tests.log"
# Run the tests from a copy of tests/ outside the checkout, so the installed package (with _C) is imported.
rm -rf /tmp/hi_tests && cp -r tests /tmp/hi_tests && printf "[pytest]\nmarkers =\n    gpu: needs CUDA\n" > /tmp/hi_tests/pytest.ini && cd /tmp/hi_tests
PYTHONUNBUFFERED=1 python3 -m pytest -q -m gpu -p no:cacheprovider test_hybrid.py test_triton_kernels.py test_graphs.py test_triton_dequant.py test_pin.py test_bench_decode.py test_triton_route.py 2>&1 | tee -a "$OUT/gpu_tests.log"
