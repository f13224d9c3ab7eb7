"""Where the host time of one hybrid decode step goes (GPU machine): M47 scaled to a few layers,
the hybrid policy at a budget, the CUDA-graph decoder, cProfile over N steps.

    python3 benchmarks/profile_step.py --layers 8 --budget 24GiB --steps 30 [--kernels]

--kernels adds the device side: torch.profiler over the same steps, CUDA kernel time per token by
kernel name (graph replays included), and the GPU's busy share of the token time.
"""
import argparse
import cProfile
import pstats
import random
import time

import torch

from hybridinfer.bench.decode import budget_scale
from hybridinfer.bench.decode_measure import spread_token
from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.workload import make_workload, synthetic_profile
from hybridinfer.graphs import GraphDecoder
from hybridinfer.kernels import cpu
from hybridinfer.budget import parse_budget, pcie_share_arg

_RNG = random.Random(0)


def nxt(logits) -> int:
    """The benchmark's next token (argmax + seeded offset: real MoE routing, not a greedy loop)."""
    return spread_token(logits, _RNG)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--budget", default="24GiB")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernels", action="store_true", help="also the CUDA kernel time per token")
    ap.add_argument("--policy", default="hybrid", help="a bench decode policy (hybrid, gpu-sparse, ...)")
    ap.add_argument("--host", action="store_true",
                    help="also the host's time per call: graph replays, waits, cold halves")
    ap.add_argument("--capacity", type=int, default=1024, help="static KV cache positions")
    ap.add_argument("--no-chain", action="store_true",
                    help="the per-layer host loop instead of the chained step (graphs.py)")
    ap.add_argument("--pcie-share", type=pcie_share_arg, default="auto",
                    help="the hybrid's warm tier: share of each expert's expected cold activity "
                         "the GPU reads over PCIe, 0..1 or auto (the default; 0: none)")
    ap.add_argument("--prefill", type=int, default=0,
                    help="profile one prompt of this many tokens instead of decode steps")
    a = ap.parse_args()
    cpu.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev, dt = torch.device(a.device), torch.bfloat16
    wl = make_workload("M47", a.layers, 0)
    prof = synthetic_profile(wl)
    scale = budget_scale(wl, a.capacity)         # as bench decode scales a budget to fewer layers
    b = build(a.policy, wl, dev, dt, dt, int(parse_budget(a.budget) * scale), prof, a.capacity,
              a.pcie_share)
    if a.prefill:
        return prefill_profile(b.model, a.prefill, dev)
    gd = GraphDecoder(b.model, a.capacity, chain=not a.no_chain)
    print(f"chained step: {gd._chained}; warm layers: {gd.warm_layers}")
    tok = 1
    for _ in range(2):
        tok = nxt(gd.step(tok))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        tok = nxt(gd.step(tok))
    print(f"{(time.perf_counter() - t) / a.steps * 1e3:.2f} ms/token ({a.layers} layers)")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(a.steps):
        tok = nxt(gd.step(tok))
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(22)
    if a.host:
        host_table(gd, tok, a.steps)
    if a.kernels:
        kernel_table(gd, tok, a.steps, a.layers)


def host_table(gd, tok, steps):
    """Host seconds per call of the decoder's pieces (wrapped with timers): a graph replay (the
    launch), a wait on the device, a cold half (ColdStep.run), per token. Chained step: the
    main thread's wait for the chain (join), and the service thread's flag waits and cold
    halves (its native counters)."""
    from hybridinfer.graphs import GraphDecoder
    acc = {"replay": [0.0, 0], "wait": [0.0, 0], "cold": [0.0, 0], "join": [0.0, 0]}

    def timed(fn, key):
        def run(*a):
            t = time.perf_counter()
            out = fn(*a)
            acc[key][0] += time.perf_counter() - t
            acc[key][1] += 1
            return out
        return run
    gd._A = [timed(f, "replay") for f in gd._A]
    wait = GraphDecoder.__dict__["_wait"]                  # the staticmethod object
    GraphDecoder._wait = staticmethod(timed(wait.__func__, "wait"))
    join = GraphDecoder.__dict__["_join_chain"]
    GraphDecoder._join_chain = staticmethod(timed(join.__func__, "join"))
    ch = gd._chain._c if gd._chain is not None else None
    c0 = (ch.busy_s(), ch.wait_s(), ch.waits()) if ch else None
    for cs in gd._coldstep:
        if cs is not None:
            cs.run = timed(cs.run, "cold")
    t = time.perf_counter()
    for _ in range(steps):
        tok = nxt(gd.step(tok))
    wall = (time.perf_counter() - t) / steps
    GraphDecoder._wait = wait
    GraphDecoder._join_chain = join
    if ch:
        n = ch.waits() - c0[2]
        acc["chain cold"] = [ch.busy_s() - c0[0], n]
        acc["chain flag"] = [ch.wait_s() - c0[1], n]
    print(f"host, per token ({wall * 1e3:.2f} ms wall):")
    for k, (s, n) in acc.items():
        if n:
            print(f"  {k:10s} {n / steps:6.1f} calls  {s / steps * 1e3:7.3f} ms  {s / n * 1e6:7.1f} us/call")


def prefill_profile(model, n, dev):
    """One n-token prompt after a warm-up prompt: wall time, cProfile, CUDA kernels by name."""
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(5)

    def once():
        ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=g).to(dev)
        with torch.inference_mode():
            model(ids, model.new_cache(n + 1), last_only=True)
        torch.cuda.synchronize()
    once()
    t = time.perf_counter()
    once()
    print(f"prefill {n} tokens: {n / (time.perf_counter() - t):.0f} tok/s")
    pr = cProfile.Profile()
    pr.enable()
    once()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(15)
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        once()
    rows = {}
    for e in p.events():
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        c, s = rows.get(e.name[:60], (0, 0.0))
        rows[e.name[:60]] = (c + 1, s + us)
    print(f"GPU busy {sum(s for _, s in rows.values()) / 1e3:.1f} ms")
    for k, (c, s) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"{k:60s} {c:6d} {s / 1e3:9.2f} ms")


def kernel_table(gd, tok, steps, layers):
    """CUDA kernel time per token by kernel name; busy = sum of kernel times / wall time."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t = time.perf_counter()
        for _ in range(steps):
            tok = nxt(gd.step(tok))
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
    rows, total, n = {}, 0.0, 0
    for e in p.events():
        if e.device_type.name == "CUDA":
            us = e.device_time if hasattr(e, "device_time") else e.cuda_time
            k = e.name[:60]
            c, s = rows.get(k, (0, 0.0))
            rows[k] = (c + 1, s + us)
            total += us
            n += 1
    print(f"GPU kernels: {n / steps:.0f} per token, {total / steps / 1e3:.2f} ms busy per token of "
          f"{wall * 1e3:.2f} ms wall ({total / steps / 1e3 / (wall * 1e3):.0%}), {layers} layers")
    print(f"{'kernel':60s} {'calls/tok':>9s} {'us/tok':>9s} {'us/call':>8s}")
    for k, (c, s) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:30]:
        print(f"{k:60s} {c / steps:9.1f} {s / steps:9.1f} {s / c:8.2f}")


if __name__ == "__main__":
    main()
