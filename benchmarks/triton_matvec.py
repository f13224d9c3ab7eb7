"""The q4_0 GEMV of DeviceLinear (attention projections, lm_head) against torch's bf16 matmul and
the device's copy bandwidth, one token (GPU machine):

    python3 benchmarks/triton_matvec.py [--json FILE]

Shapes: M47's q (4096 x 4096), k/v (1024 x 4096), lm_head (57024 x 4096) and an FFN-sized
14336 x 4096. Each op is captured in a CUDA graph of 50 calls (launch overhead out, as in the
decoder's graphs) and timed over replays with CUDA events; bytes = the weight bytes it reads.
"""
import argparse
import json

import torch
import torch.nn.functional as F

from hybridinfer.kernels import triton_ffn
from hybridinfer.kernels.gpu import DeviceLinear, dequant

SHAPES = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("lm_head", 57024, 4096), ("ffn", 14336, 4096)]
CALLS = 50


def timed(fn, reps: int = 20, calls: int = CALLS) -> float:
    """Seconds per call: `calls` calls in one graph, median of reps replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / calls)
    return sorted(out)[len(out) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    src = torch.empty(1 << 28, dtype=torch.uint8, device=dev)      # 256 MiB copy probe
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), reps=10)
    copy_gbs = 2 * src.numel() / copy_s / 1e9                      # read + write
    print(f"device copy: {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    print(f"{'shape':<10} {'n x d':>13} {'q4_0 us':>8} {'GB/s':>6} {'/copy':>6} {'bf16 us':>8} {'GB/s':>6} {'bf16/q4':>8}")
    for name, n, d in SHAPES:
        w = torch.randn(n, d, device=dev, dtype=torch.bfloat16) / d ** 0.5
        m = DeviceLinear.from_weight(w, "q4_0", dev)
        x = torch.randn(d, device=dev, dtype=torch.bfloat16)
        y = triton_ffn.matvec("q4_0", d, m.weight, x)
        wd = dequant(m.weight, "q4_0", d, torch.float32, gpu_layout=True)
        err = float((y - wd @ x.float()).abs().max() / (wd @ x.float()).abs().max())
        tq = timed(lambda: triton_ffn.matvec("q4_0", d, m.weight, x))
        tb = timed(lambda: F.linear(x[None], w))
        gq, gb = m.nbytes / tq / 1e9, w.numel() * 2 / tb / 1e9
        rows.append(dict(shape=name, n=n, d=d, q4_us=tq * 1e6, q4_gbs=gq, q4_over_copy=gq / copy_gbs,
                         bf16_us=tb * 1e6, bf16_gbs=gb, speedup=tb / tq, rel_err=err))
        print(f"{name:<10} {n:>6} x {d:<5} {tq * 1e6:>8.1f} {gq:>6.0f} {gq / copy_gbs:>6.2f} "
              f"{tb * 1e6:>8.1f} {gb:>6.0f} {tb / tq:>8.2f}   (err {err:.1e})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
