"""Where the host time of one hybrid decode step goes (GPU machine): M47 scaled to a few layers,
the hybrid policy at a budget, the CUDA-graph decoder, cProfile over N steps.

    python3 benchmarks/profile_step.py --layers 8 --budget 24GiB --steps 30
"""
import argparse
import cProfile
import pstats
import time

import torch

from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.workload import make_workload, synthetic_profile
from hybridinfer.graphs import GraphDecoder
from hybridinfer.kernels import cpu
from hybridinfer.placement import parse_budget


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--budget", default="24GiB")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    cpu.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev, dt = torch.device(a.device), torch.bfloat16
    wl = make_workload("M47", a.layers, 0)
    prof = synthetic_profile(wl)
    scale = a.layers / 32
    b = build("hybrid", wl, dev, dt, dt, int(parse_budget(a.budget) * scale), prof, 1024)
    gd = GraphDecoder(b.model, 1024)
    tok = 1
    for _ in range(2):
        tok = int(gd.step(tok).argmax())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        tok = int(gd.step(tok).argmax())
    print(f"{(time.perf_counter() - t) / a.steps * 1e3:.2f} ms/token ({a.layers} layers)")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(a.steps):
        tok = int(gd.step(tok).argmax())
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
