"""Launch-parameter sweep of the one-token q4_0 GEMV (matvec) and the transposed axpy (down) at
the shapes of a decode step's critical path (GPU machine):

    python3 benchmarks/triton_sweep.py [--json FILE]

  qkv      matvec 6144 x 4096 (q, k, v stacked)        o      matvec 4096 x 4096
  fc1      matvec_slots, 2 slots of 1024 x 4096        lm     matvec 32000 x 4096
  fc2      down_slots, 2 slots of 1024 rows of 14336 columns, half of the coefficients 0 (relu)
With --density D (the hot half of a decode step's MoE layer, a share D of the hot rows live):
  gu       gate_up_slots, 2 slots of 14336 hot rows x 4096, drelu, the mask set on a share D
           (bytes: the live gate rows + the up rows of the half whose gate fires)
  dn       down_slots, 2 slots of 14336 rows of 4096 columns, a share D of the coefficients != 0
  both over 8 experts, each call's two slots another pair (4 pairs: 800 MB, not the 50 MB L2).
With --warm D (the warm tier: rows in page-locked host memory, GGUF layout, read over PCIe):
  wgu, wdn as gu, dn over --n-warm rows an expert (default 2580: M47's non-hot rows at 24 GiB),
  a share D of them live.
Each configuration is captured in a CUDA graph of 50 calls and timed over replays (as
benchmarks/triton_matvec.py); the default (triton_ffn.config) is marked '*'. Prints the best per
shape and its speed-up over the default; checks every result against the default's.
"""
import argparse
import itertools
import json
import time

import torch

from hybridinfer import quant
from hybridinfer.kernels import triton_ffn as tk
from hybridinfer.kernels.gpu import DeviceLinear
from triton_matvec import timed


def q4(n, d, dev, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(n, d, generator=g) / d ** 0.5).to(dev, torch.bfloat16)
    return DeviceLinear.from_weight(w, "q4_0", dev).weight


def q4_host(n, d, seed):
    """n q4_0 rows in GGUF's layout in page-locked host memory (the warm tier's rows)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return quant.pack(torch.randn(n, d, generator=g) / d ** 0.5, "q4_0").pin_memory()


def hot_ops(d: int, nff: int, dens: float, dev, warm: bool = False) -> dict:
    """gu@D and dn@D (module docstring), or wgu@D and wdn@D (warm: nff rows an expert on the
    host): name -> (fn(cfg) -> result, bytes a call reads)."""
    g = torch.Generator(device="cpu").manual_seed(int(dens * 1000))
    E, k = 8, 2
    mk = ((lambda seed: [q4_host(nff, d, seed + e) for e in range(E)]) if warm else
          (lambda seed: [q4(nff, d, dev, seed + e) for e in range(E)]))
    gt, ut, dt = (tk.RowTable.build("q4_0", d, mk(s), dev, gguf=warm) for s in (100, 200, 300))
    it = tk.RowTable.build(None, d, [torch.arange(nff, dtype=torch.int32, device=dev)] * E, dev)
    sels = [torch.tensor([2 * i, 2 * i + 1], device=dev) for i in range(E // k)]
    mask = (torch.rand(k, nff, generator=g) < dens).to(dev)
    x = torch.randn(d, device=dev, dtype=torch.bfloat16)
    a = torch.zeros(k, nff, device=dev)
    coef = torch.randn(k, nff, generator=g).to(dev) * mask
    y = torch.zeros(1, d, device=dev)
    rb = d * 18 // 32
    turn = [0]

    def sel(check):                 # another pair of experts each call (captured in turn)
        turn[0] += 1
        return sels[0 if check else turn[0] % len(sels)]

    live = float(mask.sum())
    w = "w" if warm else ""
    return {f"{w}gu@{dens}": (lambda c, check=False: tk.gate_up_slots(
                "q4_0", d, gt, ut, it, x, "drelu", 0.0, mask, sel(check), a, c), int(live * 1.5 * rb)),
            f"{w}dn@{dens}": (lambda c, check=False: tk.down_slots(
                "q4_0", d, dt, coef, nff, y.zero_()[0], 0, sel(check), None, c), int(live * rb))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--density", type=float, nargs="*", default=[],
                    help="also sweep the hot half (gu, dn) at these live shares of the hot rows")
    ap.add_argument("--warm", type=float, nargs="*", default=[],
                    help="also sweep the warm tier (wgu, wdn) at these live shares of its rows")
    ap.add_argument("--n-warm", type=int, default=2580, help="warm rows an expert (--warm)")
    ap.add_argument("--only", nargs="*", default=None, help="sweep only these ops (e.g. gu dn)")
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
        "qkv": (lambda c, check=False: tk.matvec("q4_0", d, W["qkv"], x, c), W["qkv"].numel()),
        "o": (lambda c, check=False: tk.matvec("q4_0", d, W["o"], x, c), W["o"].numel()),
        "lm": (lambda c, check=False: tk.matvec("q4_0", d, W["lm"], x, c), W["lm"].numel()),
        "fc1": (lambda c, check=False: tk.matvec_slots("q4_0", d, fc1, x, 0, yh, sel, c), 2 * rank * d * 18 // 32),
        "fc2": (lambda c, check=False: tk.down_slots("q4_0", nff, fc2, h, rank, ys.zero_(), nff, sel, None, c),
                2 * rank * nff * 18 // 32),
    }
    for dens in a.density:
        ops.update(hot_ops(d, nff, dens, dev))
    for dens in a.warm:
        ops.update(hot_ops(d, a.n_warm, dens, dev, warm=True))
    if a.only is not None:
        ops = {k: v for k, v in ops.items() if k.split("@")[0] in a.only}
    dot_cfgs = [dict(CHUNK=c, R=r, BK=128, num_warps=w)
                for c, r, w in itertools.product([4, 8, 16, 32], [1, 2, 4], [2, 4, 8]) if r <= c]
    axpy_cfgs = [dict(CHUNK=c, R=r, BK=b, num_warps=w)
                 for c, r, b, w in itertools.product([32, 64, 128, 256], [8, 16], [4, 8, 16], [4, 8])]
    hot_dot_cfgs = [dict(CHUNK=c, R=r, BK=128, num_warps=w)
                    for c, r, w in itertools.product([16, 32, 64, 128], [2, 4, 8], [4, 8])]
    hot_axpy_cfgs = [dict(CHUNK=c, R=r, BK=b, num_warps=w)
                     for c, r, b, w in itertools.product([256, 512, 1024], [16, 32], [4, 8], [4])]
    warm_dot_cfgs = [dict(CHUNK=c, R=r, BK=128, num_warps=w)
                     for c, r, w in itertools.product([2, 4, 8, 16, 32], [1, 2, 4, 8], [1, 2, 4]) if r <= c]
    warm_axpy_cfgs = [dict(CHUNK=c, R=r, BK=b, num_warps=4)
                      for c, r, b in itertools.product([16, 32, 64, 128], [4, 8, 16], [8, 32, 128])]
    out = {}
    for name, (fn, nbytes) in ops.items():
        op = name.split("@")[0]
        kind = "down" if op in ("fc2", "dn", "wdn") else "gate_up"
        n = {"qkv": 6144, "o": d, "lm": 32000, "fc1": rank, "fc2": nff, "gu": nff, "dn": nff,
             "wgu": a.n_warm, "wdn": a.n_warm}[op]
        default = tk.config("q4_0", nff if op == "fc2" else d, n if op != "fc2" else rank)[kind]
        ref = fn(dict(default), True).clone()
        rows = []
        cands = {"fc2": axpy_cfgs, "dn": hot_axpy_cfgs, "gu": hot_dot_cfgs, "wgu": warm_dot_cfgs,
                 "wdn": warm_axpy_cfgs}.get(op, dot_cfgs)
        for cfg in [dict(default)] + cands:
            if time.time() > t_end:
                break
            try:
                y = fn(dict(cfg), True)
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
