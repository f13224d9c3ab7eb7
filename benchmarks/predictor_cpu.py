"""A predictor on the CPU, one token: fc2 as a GEMV over every row (kernels.cpu.linear) against
fc2 stored transposed with relu's zero rows skipped (relu_mlp_t, what the runtime packs since
session 8). TurboSparse-Mixtral's shapes by default (fc1 4096 -> 1024, fc2 1024 -> 14336), the
runtime's q8_0 rows; alternating calls in one process, several predictors cycled so the rows come
from memory (a decode step reads each predictor once a token).

    python benchmarks/predictor_cpu.py [--threads 2] [--fmt q8_0] [--preds 16] [--calls 200]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hybridinfer.kernels import cpu
from hybridinfer.linear import linear


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fmt", default="q8_0")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=1024)
    ap.add_argument("--n-ff", type=int, default=14336)
    ap.add_argument("--preds", type=int, default=16, help="distinct predictors cycled")
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    cpu.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    preds = []
    for _ in range(a.preds):
        w1 = torch.randn(a.rank, a.d, generator=g) / a.d ** 0.5
        w2 = torch.randn(a.n_ff, a.rank, generator=g) / a.rank ** 0.5
        preds.append((cpu.PackedLinear.from_weight(w1, a.fmt), cpu.PackedLinear.from_weight(w2, a.fmt),
                      cpu.PackedLinear.from_weight(w2.t().contiguous(), a.fmt, grouped=False)))
    xs = [torch.randn(a.d, generator=g) for _ in range(8)]
    gemv = lambda p, x: linear(F.relu(linear(x[None], p[0])), p[1])[0]
    fused = lambda p, x: cpu.relu_mlp_t(x, p[0], p[2])
    t = {"gemv": [], "fc2t": []}
    for i in range(a.calls):
        p, x = preds[i % len(preds)], xs[i % len(xs)]
        for name, fn in (("gemv", gemv), ("fc2t", fused)) if i % 2 else (("fc2t", fused), ("gemv", gemv)):
            t0 = time.perf_counter()
            fn(p, x)
            t[name].append(time.perf_counter() - t0)
    p, x = preds[0], xs[0]
    err = float((gemv(p, x) - fused(p, x)).abs().max() / gemv(p, x).abs().max())
    h = F.relu(linear(x[None], p[0]))
    print(f"{a.fmt}, d {a.d}, rank {a.rank}, n_ff {a.n_ff}, {a.threads} threads, {a.preds} predictors "
          f"({sum(q[0].weight.numel() + q[1].weight.numel() for q in preds) / 1e6:.0f} MB cycled); "
          f"relu zeros {float((h == 0).float().mean()):.2f}; max |diff| / max {err:.1e}")
    for name, v in t.items():
        print(f"  {name}: median {statistics.median(v) * 1e6:8.1f} us, mean {statistics.mean(v) * 1e6:8.1f} us")
    print(f"  gemv / fc2t: {statistics.median(t['gemv']) / statistics.median(t['fc2t']):.2f}x")


if __name__ == "__main__":
    main()
