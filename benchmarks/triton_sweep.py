"""Launch-parameter sweep of the one-token q4_0 GEMV (matvec) and the transposed axpy (down) at
the shapes of a decode step's critical path (GPU machine):

    python3 benchmarks/triton_sweep.py [--json FILE]

  qkv      matvec 6144 x 4096 (q, k, v stacked)        o      matvec 4096 x 4096
  fc1      matvec_slots, 2 slots of 1024 x 4096        lm     matvec 32000 x 4096
  fc2      down_slots, 2 slots of 1024 rows of 14336 columns, half of the coefficients 0 (relu)
Each configuration is captured in a CUDA graph of 50 calls and timed over replays (as
benchmarks/triton_matvec.py); the default (triton_ffn.config) is marked '*'. Prints the best per
shape and its speed-up over the default; checks every result against the default's.
"""
import argparse
import itertools
import json
import time

import torch

from hybridinfer.kernels import triton_ffn as tk
from hybridinfer.kernels.gpu import DeviceLinear
from triton_matvec import timed


def q4(n, d, dev, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(n, d, generator=g) / d ** 0.5).to(dev, torch.bfloat16)
    return DeviceLinear.from_weight(w, "q4_0", dev).weight


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--budget-s", type=float, default=240.0)
    a = ap.parse_args()
    dev = torch.device("cuda")
    t_end = time.time() + a.budget_s
    d, nff, rank = 4096, 14336, 1024
    x = torch.randn(d, device=dev, dtype=torch.bfloat16)
    sel = torch.tensor([5, 2], device=dev)
    W = {"qkv": q4(6144, d, dev, 1), "o": q4(d, d, dev, 2), "lm": q4(32000, d, dev, 3)}
    fc1 = tk.RowTable.build("q4_0", d, [q4(rank, d, dev, 10 + e) for e in range(8)], dev)
    fc2 = tk.RowTable.build("q4_0", nff, [q4(rank, nff, dev, 20 + e) for e in range(8)], dev)
    h = torch.randn(2, rank, device=dev).relu_()
    yh = torch.zeros(2, rank, device=dev)
    ys = torch.zeros(2, nff, device=dev)

    ops = {
        "qkv": (lambda c: tk.matvec("q4_0", d, W["qkv"], x, c), W["qkv"].numel()),
        "o": (lambda c: tk.matvec("q4_0", d, W["o"], x, c), W["o"].numel()),
        "lm": (lambda c: tk.matvec("q4_0", d, W["lm"], x, c), W["lm"].numel()),
        "fc1": (lambda c: tk.matvec_slots("q4_0", d, fc1, x, 0, yh, sel, c), 2 * rank * d * 18 // 32),
        "fc2": (lambda c: tk.down_slots("q4_0", nff, fc2, h, rank, ys.zero_(), nff, sel, None, c),
                2 * rank * nff * 18 // 32),
    }
    dot_cfgs = [dict(CHUNK=c, R=r, BK=128, num_warps=w)
                for c, r, w in itertools.product([4, 8, 16, 32], [1, 2, 4], [2, 4, 8]) if r <= c]
    axpy_cfgs = [dict(CHUNK=c, R=r, BK=b, num_warps=w)
                 for c, r, b, w in itertools.product([32, 64, 128, 256], [8, 16], [4, 8, 16], [4, 8])]
    out = {}
    for name, (fn, nbytes) in ops.items():
        kind = "down" if name == "fc2" else "gate_up"
        n = {"qkv": 6144, "o": d, "lm": 32000, "fc1": rank, "fc2": nff}[name]
        default = tk.config("q4_0", nff if name == "fc2" else d, n if name != "fc2" else rank)[kind]
        ref = fn(dict(default)).clone()
        rows = []
        for cfg in [dict(default)] + (axpy_cfgs if name == "fc2" else dot_cfgs):
            if time.time() > t_end:
                break
            try:
                y = fn(dict(cfg))
                err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                s = timed(lambda: fn(dict(cfg)), reps=10)
            except Exception as e:          # noqa: BLE001 - a config that does not compile
                print(f"  {name} {cfg}: {type(e).__name__}")
                continue
            rows.append(dict(cfg=cfg, us=s * 1e6, gbs=nbytes / s / 1e9, err=err,
                             default=len(rows) == 0))
        best = min(rows, key=lambda r: r["us"])
        print(f"{name:4s} default {rows[0]['us']:6.1f} us ({rows[0]['gbs']:5.0f} GB/s)  best "
              f"{best['us']:6.1f} us ({best['gbs']:5.0f} GB/s) x{rows[0]['us'] / best['us']:.2f} "
              f"{best['cfg']}  err {max(r['err'] for r in rows):.1e}")
        for r in sorted(rows, key=lambda r: r["us"])[:5]:
            print(f"      {r['us']:6.1f} us {r['cfg']}{' *' if r['default'] else ''}")
        out[name] = rows
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
