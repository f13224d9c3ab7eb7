"""The dense q4_0 `linear` over GGUF rows vs grouped rows (quant.group_q4_0, kernels.h Q4_0G),
cold (LLC flushed, rotating weight copies), interleaved in one process: the A/B behind
docs/KERNELS.md "q4_0 grouped rows". Since c7d99ec the GGUF side also reads 8 blocks at a time
(dot2's groups), so its figures are faster than the ones recorded at b729ab7.

    python benchmarks/linear_grouped_ab.py [--threads 1] [--repeat 9]
"""
import argparse
import math
import statistics
import time

import torch

from hybridinfer import quant
from hybridinfer.bench import machine
from hybridinfer.bench.kernels import random_packed
from hybridinfer.kernels import cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=9)
    a = ap.parse_args()
    cpu.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    bw = machine.read_bandwidth(a.threads)
    print(f"threads {a.threads}, read probe {bw:.1f} GB/s, loadavg {open('/proc/loadavg').read().split()[:3]}")
    x = torch.randn(4096, generator=g)
    for rows in (4096, 14336):
        copies = max(2, math.ceil(6e8 / (rows * quant.row_bytes(4096, "q4_0"))))
        raw = [cpu.to_weights(random_packed("q4_0", rows, 4096, g)) for _ in range(copies)]
        variants = {"gguf": [cpu.PackedLinear("q4_0", 4096, rows, r) for r in raw],
                    "grouped": [cpu.PackedLinear("q4_0", 4096, rows, cpu.to_weights(quant.group_q4_0(r)),
                                                 True) for r in raw]}
        nbytes = raw[0].numel()
        res = {k: [] for k in variants}
        for r in range(a.repeat + 1):                 # the first round warms up, dropped
            for name, ms in variants.items():
                machine.flush_caches()
                t = time.perf_counter()
                cpu.linear(x, ms[r % copies])
                if r:
                    res[name].append(time.perf_counter() - t)
        for name, v in res.items():
            med = statistics.median(v)
            print(f"linear {rows} x 4096 {name:8s}: {med * 1e3:.2f} ms, {nbytes / med / 1e9:.1f} GB/s, "
                  f"{nbytes / med / 1e9 / bw:.2f} of the probe")
        ya, yb = (cpu.linear(x, variants[k][0]) for k in ("gguf", "grouped"))
        print(f"  max relative difference {float((ya - yb).abs().max() / ya.abs().max()):.2g}")
    machine.release_buffer()


if __name__ == "__main__":
    main()
