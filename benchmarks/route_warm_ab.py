"""Two decode-step variants A/B'd in one process on the GPU machine, M47 scaled to 8 layers, the
hybrid at a budget (as benchmarks/profile_step.py builds it), CUDA-graph decoder:

  route_one  one token's routing in one Triton launch (kernels/triton_route.py, shipped) or by
             torch (cuBLAS GEMV + softmax + k max reductions: seven kernels a layer)
  warm_cfg   the warm tier's kernels (GGUF rows in host memory, read over PCIe) with the launch
             parameters of benchmarks/triton_sweep.py --warm 0.03's best (gate_up CHUNK 8 R 2,
             down CHUNK 128 R 4 BK 32; not shipped) or the hot rows' (triton_ffn.config, shipped)

    python3 benchmarks/route_warm_ab.py [--budget 24GiB] [--trace DIR]

Prints ms/token of the four combinations, 4 rounds of 30 tokens interleaved; --trace writes the
CUDA kernel sequence (start, gap to the previous kernel's end, duration, name; us) of 3 tokens
of the all-off and all-on variants.
"""
import argparse
import random
import time

import torch
import torch._dynamo

from hybridinfer.bench.decode import budget_scale
from hybridinfer.bench.decode_measure import spread_token
from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.workload import make_workload, synthetic_profile
from hybridinfer.budget import parse_budget
from hybridinfer.graphs import GraphDecoder
from hybridinfer.kernels import cpu, gpu
from hybridinfer.kernels import triton_ffn as tk

WARM = {"gate_up": dict(CHUNK=8, R=2, BK=128, num_warps=4),
        "down": dict(CHUNK=128, R=4, BK=32, num_warps=4)}
ORIG = {"route_one": gpu.route_one, "gate_up_slots": tk.gate_up_slots, "down_slots": tk.down_slots}


def warm_gate_up(fmt, d, gt, ut, it, x, act, threshold, mask, sel, a, cfg=None):
    return ORIG["gate_up_slots"](fmt, d, gt, ut, it, x, act, threshold, mask, sel, a,
                                 dict(WARM["gate_up"]) if gt.gguf and cfg is None else cfg)


def warm_down(fmt, d, wt, a, a_stride, y, y_stride, sel, rw=None, cfg=None, relu_a=False):
    return ORIG["down_slots"](fmt, d, wt, a, a_stride, y, y_stride, sel, rw,
                              dict(WARM["down"]) if wt.gguf and cfg is None else cfg, relu_a)


def variant(model, route_on: bool, warm_on: bool) -> GraphDecoder:
    """A decoder captured with the variant's functions in place (they are read at capture)."""
    gpu.route_one = ORIG["route_one"] if route_on else (lambda x, router, k: None)
    tk.gate_up_slots = warm_gate_up if warm_on else ORIG["gate_up_slots"]
    tk.down_slots = warm_down if warm_on else ORIG["down_slots"]
    torch._dynamo.reset()                   # the decode step is compiled afresh (route is traced)
    return GraphDecoder(model, 1024)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="24GiB")
    ap.add_argument("--trace", help="write the kernel sequences here")
    a = ap.parse_args()
    cpu.set_num_threads(8)
    torch.set_num_threads(8)
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    wl = make_workload("M47", 8, 0)
    b = build("hybrid", wl, dev, dt, dt, int(parse_budget(a.budget) * budget_scale(wl, 1024)),
              synthetic_profile(wl), 1024, "auto")
    rng = random.Random(0)

    def run(gd, n):
        tok = 1
        for _ in range(n):
            tok = spread_token(gd.step(tok), rng)
        torch.cuda.synchronize()
    V = [(0, 0), (1, 0), (0, 1), (1, 1)]
    gds = {v: variant(b.model, *v) for v in V}
    for v in V:
        run(gds[v], 5)
    res = {v: [] for v in V}
    for _ in range(4):
        for v in V:
            t = time.perf_counter()
            run(gds[v], 30)
            res[v].append((time.perf_counter() - t) / 30 * 1e3)
    for v in V:
        print(f"route_one={v[0]} warm_cfg={v[1]}: ms/token (8 layers) "
              f"{', '.join(f'{x:.3f}' for x in sorted(res[v]))}", flush=True)
    if a.trace:
        from torch.profiler import ProfilerActivity, profile
        for v in [(0, 0), (1, 1)]:
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                run(gds[v], 3)
            ev = sorted((e for e in p.events() if e.device_type.name == "CUDA"),
                        key=lambda e: e.time_range.start)
            with open(f"{a.trace}/trace_route{v[0]}_warm{v[1]}.txt", "w") as f:
                t0 = prev = ev[0].time_range.start
                for e in ev:
                    s, d = e.time_range.start, e.time_range.end - e.time_range.start
                    f.write(f"{s - t0:10.2f} {s - prev:7.2f} {d:7.2f}  {e.name[:90]}\n")
                    prev = max(prev, e.time_range.end)


if __name__ == "__main__":
    main()
