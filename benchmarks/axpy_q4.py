"""The q4_0 AXPY (csrc/qaxpy_avx2.cpp) through its two callers at M7 / M47 shapes, one token:
down_sparse over 10-15 % of a 14336 x 4096 down_t (the FFN's down rows) and rows_axpy over a
predictor's fc2^T (1024 rows x 14336, relu'd coefficients, ~50 % zero), rows from DRAM (several
matrices cycled, more than the LLC). Variants are environment settings read by a scratch build
(e.g. --ab HI_SCRATCH_AXPY=0 HI_SCRATCH_AXPY=3); the rounds alternate them in one process, so
the VM's drift hits all alike. Prints the median per variant and round.

    python benchmarks/axpy_q4.py [--threads 1 2] [--rounds 5] [--ab VAR=a VAR=b ...]
"""
import argparse
import os
import statistics
import time

import torch

from hybridinfer import quant
from hybridinfer.kernels import cpu


def _packed_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, d, generator=g) / d ** 0.5
    return cpu.to_weights(quant.pack(w, "q4_0"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=24, help="timed calls per variant and round")
    ap.add_argument("--density", type=float, default=0.12, help="FFN down ids, share of 14336")
    ap.add_argument("--hot", action="store_true",
                    help="one matrix and id set (rows in the LLC) instead of cycling from DRAM")
    ap.add_argument("--ab", nargs="*", default=["_NONE=0"], help="VAR=value per variant")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    d, n_ff, rank = 4096, 14336, 1024
    downs = [cpu.PackedFFN("q4_0", d, n_ff, *(3 * [_packed_rows(n_ff, d, g)])) for _ in range(3)]
    preds = [cpu.PackedLinear("q4_0", n_ff, rank, _packed_rows(rank, n_ff, g)) for _ in range(12)]
    k = int(a.density * n_ff)
    idsets = [torch.randperm(n_ff, generator=g)[:k].sort().values.to(torch.int32) for _ in range(8)]
    coefs = [torch.randn(k, generator=g) for _ in range(8)]
    hs = [torch.relu(torch.randn(rank, generator=g)) for _ in range(8)]
    if a.hot:
        downs, preds, idsets, coefs, hs = downs[:1], preds[:1], idsets[:1], coefs[:1], hs[:1]
    nd, nps, ni = len(downs), len(preds), len(idsets)
    cases = {
        f"down {k}/{n_ff} x {d}": lambda i: cpu.down_sparse(downs[i % nd], coefs[(i * 3) % ni], idsets[(i * 3) % ni]),
        f"fc2t {rank} x {n_ff} ~50%": lambda i: cpu.rows_axpy(hs[i % ni], preds[i % nps]),
    }
    variants = [v.split("=", 1) for v in a.ab]
    # numerics: every variant against the first on one input (same arithmetic: expect ~0)
    for name, f in cases.items():
        ys = []
        for var, val in variants:
            os.environ[var] = val
            ys.append(f(0))
        print(name, "max |y - y_first|:", [float((y - ys[0]).abs().max()) for y in ys])
    for T in a.threads:
        cpu.set_num_threads(T)
        res = {(c, v): [] for c in cases for v in a.ab}
        for r in range(a.rounds):
            for vi, (var, val) in enumerate(variants):
                os.environ[var] = val
                for name, f in cases.items():
                    for i in range(4):
                        f(i)   # warm the code path; rows still cycle from DRAM below
                    ts = []
                    for i in range(a.calls):
                        t0 = time.perf_counter()
                        f(i + 4)
                        ts.append(time.perf_counter() - t0)
                    res[(name, a.ab[vi])].append(statistics.median(ts) * 1e3)
        with open("/proc/loadavg") as fh:
            la = fh.read().split()[:3]
        for name in cases:
            for v in a.ab:
                xs = res[(name, v)]
                print(f"T{T} {name:24s} {v:20s} median {statistics.median(xs):.3f} ms  rounds "
                      + " ".join(f"{x:.3f}" for x in xs))
        print("loadavg", *la, flush=True)


if __name__ == "__main__":
    main()
