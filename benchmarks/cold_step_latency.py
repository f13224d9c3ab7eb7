"""How long the decode step's cold half (kernels.cpu_step.ColdStep.run) takes for the few rows a layer
has at large VRAM budgets, where it sits on the critical path between two layers' GPU work:

    python3 benchmarks/cold_step_latency.py [--threads 1 2 4 8] [--rows 32 128 512 2048] [--json FILE]

M47 shapes (d 4096, q4_0), top-2 of 8 experts per layer, `--layers` distinct layers of cold rows
cycled so the rows come from memory as in decode (not cache), masks with `rows` active cold rows
per layer (split over the two chosen experts). Prints microseconds per call, the effective GB/s
of the rows read, and the fixed cost (the call with no active rows).
"""
import argparse
import json
import time

import numpy as np
import torch

from hybridinfer.kernels import cpu, cpu_step
from hybridinfer.quant import row_bytes

D, E, K = 4096, 8, 2


def packed_rows(n: int, gen: torch.Generator) -> torch.Tensor:
    """n random q4_0 rows (GGUF layout) with a small fixed scale (finite values)."""
    nb = D // 32
    r = torch.randint(0, 256, (n, nb, 18), dtype=torch.uint8, generator=gen)
    r[:, :, 0], r[:, :, 1] = 0x66, 0x26                      # f16 0.025
    return cpu.to_weights(r.reshape(n, nb * 18))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rows", type=int, nargs="+", default=[0, 32, 128, 512, 2048],
                    help="active cold rows per layer (both chosen experts together)")
    ap.add_argument("--n-cold", type=int, default=2048, help="cold rows per expert")
    ap.add_argument("--layers", type=int, default=24, help="distinct layers cycled")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json")
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    n_ff = 14336
    x, y = torch.randn(D), torch.zeros(D)
    sel, w = torch.zeros(K, dtype=torch.int64), torch.full((K,), 0.5)
    masks = torch.zeros(K, n_ff, dtype=torch.bool)
    layers = []
    for _ in range(a.layers):
        ffns, neurons = [], []
        for _ in range(E):
            ffns.append(cpu.PackedFFN("q4_0", D, a.n_cold, packed_rows(a.n_cold, gen),
                                      packed_rows(a.n_cold, gen), packed_rows(a.n_cold, gen)))
            neurons.append(torch.from_numpy(np.sort(rng.choice(n_ff, a.n_cold, replace=False))))
        layers.append((ffns, neurons, cpu_step.ColdStep(ffns, neurons, [None] * E, x, y, sel, w,
                                                        "relu", slot_masks=masks)))
    rb3 = 3 * row_bytes(D, "q4_0")
    out = []
    print(f"{'threads':>7} {'rows':>6} {'us/call':>9} {'GB/s':>7}")
    for t in a.threads:
        cpu.set_num_threads(t)
        for rows in a.rows:
            secs = []
            for r in range(a.reps):
                ffns, neurons, cs = layers[r % len(layers)]
                sel.copy_(torch.from_numpy(rng.choice(E, K, replace=False)))
                masks.zero_()
                for s in range(K):                     # rows/K active cold rows in each expert
                    nr = neurons[int(sel[s])]
                    on = rng.choice(nr.numel(), min(nr.numel(), rows // K), replace=False)
                    masks[s, nr[on]] = True
                t0 = time.perf_counter()
                cs.run()
                secs.append(time.perf_counter() - t0)
            us = float(np.median(secs)) * 1e6
            gbs = rows * rb3 / (us * 1e-6) / 1e9 if rows else 0.0
            out.append(dict(threads=t, rows=rows, us=us, gbs=gbs))
            print(f"{t:>7} {rows:>6} {us:>9.1f} {gbs:>7.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n_cold": a.n_cold, "layers": a.layers, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
