"""The one-token q4_0 GEMV: the float-dequant kernel (triton_ffn, its launch config) vs the
integer-dot kernel (triton_q8x: x quantised to q8, dp4a), at the decode step's dense shapes,
GPU machine; then the hot half's gate_up with float vs integer dots (Q8X). The weights are rotated over 8 copies (each call reads another: HBM, not the 50 MB
L2); each call is timed in a CUDA graph of 48 calls (triton_matvec.timed). The q8x time
includes quantising x (its own launch, also shown alone).

    python3 benchmarks/triton_q8x.py [--json FILE]
"""
import argparse
import json

import torch

from hybridinfer.kernels import triton_ffn as tk
from hybridinfer.kernels import triton_q8x as q8
from hybridinfer.kernels.gpu import DeviceLinear
from triton_matvec import timed

SHAPES = (("k/v", 1024), ("q/o", 4096), ("qkv", 6144), ("ffn", 14336), ("lm", 32000))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    dev, d = torch.device("cuda"), 4096
    g = torch.Generator().manual_seed(0)
    copy = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    t_copy = timed(lambda: copy[1 << 27:].copy_(copy[:1 << 27]), calls=8)
    print(f"{torch.cuda.get_device_name()}; device copy {2 * (1 << 27) / t_copy / 1e9:.0f} GB/s (read + write)")
    print(f"{'shape':6s} {'n':>6s}  float us   GB/s  q8x us   GB/s  x q8 us  float/q8x  rel err")
    rows = []
    for name, n in SHAPES:
        ws = [DeviceLinear.from_weight((torch.randn(n, d, generator=g) / d ** 0.5).to(dev, torch.bfloat16),
                                       "q4_0", dev).weight for _ in range(8)]
        x = torch.randn(d, generator=g).to(dev, torch.bfloat16)
        cfg = tk.config("q4_0", d, n)["gate_up"]
        ref = tk.matvec("q4_0", d, ws[0], x, cfg=dict(cfg)).double()
        err = float((q8.matvec(d, ws[0], x).double() - ref).abs().max() / ref.abs().max())
        turn = [0]

        def call(fn):
            def f():
                turn[0] += 1
                fn(ws[turn[0] % 8])
            return f
        tf = timed(call(lambda w: tk.matvec("q4_0", d, w, x, cfg=dict(cfg))))
        tq = timed(call(lambda w: q8.matvec(d, w, x)))
        tx = timed(lambda: q8.packed_x(x, d))
        nb = ws[0].numel()
        rows.append(dict(shape=name, n=n, d=d, bytes=nb, float_us=tf * 1e6, q8x_us=tq * 1e6,
                         quant_x_us=tx * 1e6, rel_err=err))
        print(f"{name:6s} {n:6d}  {tf * 1e6:8.2f} {nb / tf / 1e9:6.0f}  {tq * 1e6:6.2f} {nb / tq / 1e9:6.0f}"
              f"  {tx * 1e6:7.2f}  {tf / tq:9.2f}  {err:.1e}", flush=True)
    # the hot half's gate_up (2 slots of 14336 hot rows x 4096, drelu, a share D of the rows
    # live; triton_sweep.hot_ops): the float dots (Q8X=False) vs the integer dots, both with
    # gate_up's default launch config
    from triton_sweep import hot_ops
    print(f"{'gate_up':8s} {'live':>5s}  float us   GB/s  q8x us   GB/s  float/q8x")
    for dens in (0.15, 0.5, 1.0):
        fn, nbytes = hot_ops(d, 14336, dens, dev)[f"gu@{dens}"]
        cfg = tk.config("q4_0", d, 14336)["gate_up"]
        tf = timed(lambda: fn(dict(cfg, Q8X=False)))
        tq = timed(lambda: fn(dict(cfg)))
        rows.append(dict(shape="gate_up_slots", live=dens, bytes=nbytes, float_us=tf * 1e6,
                         q8x_us=tq * 1e6))
        print(f"{'':8s} {dens:5.2f}  {tf * 1e6:8.2f} {nbytes / tf / 1e9:6.0f}  {tq * 1e6:6.2f}"
              f" {nbytes / tq / 1e9:6.0f}  {tf / tq:9.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": 2 * (1 << 27) / t_copy / 1e9,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
