"""Host time of the torch calls a prefill expert issues, GPU machine (the prompt is host-bound:
benchmarks/prefill_profile.py). Each form is issued `n` times back to back with no sync in
between (the GPU queue absorbs it) and timed on the host; shapes of one M47 expert at ~128 tokens.

    python3 benchmarks/host_ops.py [--n 200]
"""
import argparse
import time

import torch
import torch.nn.functional as F

from hybridinfer.kernels.triton_dequant import dequant_q4_0


def host_us(fn, n: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="calls per form")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    m, d, n = 128, 4096, 2048                       # tokens, hidden, rows (small: host time only)
    x = torch.randn(512, d, device=dev, dtype=dt)
    tok = torch.randperm(512, device=dev)[:m].sort().values
    w = torch.randn(3, n, d, device=dev, dtype=dt)
    xs = x[:m].contiguous()
    rows = torch.randint(0, 256, (3, n, d // 32 * 18), dtype=torch.uint8, device=dev)
    rows[..., 0:2] = 0                                  # f16 scales: keep them small and finite
    host = torch.randint(0, 256, (3, n, d // 32 * 18), dtype=torch.uint8).pin_memory()
    side = torch.cuda.Stream()
    cur = torch.cuda.current_stream()
    forms = {
        "F.linear gate [m,d]x[n,d]^T": lambda: F.linear(xs, w[0]),
        "F.linear gate|up [m,d]x[2n,d]^T": lambda: F.linear(xs, w[:2].view(2 * n, d)),
        "matmul a @ down_t": lambda: torch.empty(m, n, device=dev, dtype=dt) @ w[2],
        "x[tok]": lambda: x[tok],
        "x.index_select(0, tok)": lambda: x.index_select(0, tok),
        "relu": lambda: F.relu(xs),
        "mul": lambda: xs * xs,
        "dequant_q4_0 (Triton launch)": lambda: dequant_q4_0(rows, d, "gguf", dt),
        "torch.empty [3,n,rb] + 1 H2D copy": lambda: torch.empty_like(rows).copy_(host, non_blocking=True),
        "torch.cuda.current_stream(dev)": lambda: torch.cuda.current_stream(dev),
        "with torch.cuda.stream(side)": lambda: torch.cuda.stream(side).__enter__() or torch.cuda.set_stream(cur),
        "set_stream(side); set_stream(cur)": lambda: (torch.cuda.set_stream(side), torch.cuda.set_stream(cur)),
        "torch.cuda.Event() + record": lambda: torch.cuda.Event().record(cur),
    }
    for lib in ("default", "cublas", "cublaslt"):
        if lib != "default":
            torch.backends.cuda.preferred_blas_library(lib)
        print(f"blas library: {torch.backends.cuda.preferred_blas_library()}")
        for name, fn in forms.items():
            if lib == "default" or "linear" in name or "matmul" in name:
                print(f"  {name:40s} {host_us(fn, a.n):7.1f} us host")


if __name__ == "__main__":
    main()
