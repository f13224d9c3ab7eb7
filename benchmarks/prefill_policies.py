"""Prefill of M47 per policy on the GPU machine, as `bench decode` runs it (the budget's VRAM cap,
a short decode first), over several prompts: tokens/s of each 512-token prompt, the allocator's
events, a cProfile of one prompt (host time) and the GPU's copy and kernel time of another.

    python3 benchmarks/prefill_policies.py hybrid@24GiB dense-offload@24GiB gpu-sparse gpu-dense

(bench decode reports the median of 3 prompts; this script shows the spread and where it goes.)
Run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, as benchmarks/decode_gpu.sh does."""
import cProfile
import pstats
import sys
import time

import torch

from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.decode_measure import vram_cap, measure
from hybridinfer.bench.workload import make_workload, synthetic_profile
from hybridinfer.kernels import cpu
from hybridinfer.budget import parse_budget
cpu.set_num_threads(8); torch.set_num_threads(8)
dev, dt = torch.device("cuda"), torch.bfloat16
wl = make_workload("M47", None, 0); prof = synthetic_profile(wl)
PROMPTS = 6
pols = [p.split("@") for p in sys.argv[1:]]
def prompt(model, n, g):
    ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=g).to(dev)
    cache = model.new_cache(n + 1); torch.cuda.synchronize(); t = time.perf_counter()
    with torch.inference_mode():
        model(ids, cache, last_only=True)
    torch.cuda.synchronize(); return time.perf_counter() - t
for p in pols:
    name, b = p[0], (p[1] if len(p) > 1 else None)
    bb = int(parse_budget(b)) if b else None
    with vram_cap(dev, bb):
        t0 = time.perf_counter(); bl = build(name, wl, dev, dt, dt, bb, prof, 4096, "auto")
        print(f"=== {name}@{b}: built {time.perf_counter()-t0:.0f} s; alloc {torch.cuda.memory_allocated()/2**30:.2f} GiB", flush=True)
        r = measure(bl, 2, 3, 0, 4096, graphs=True)
        print(f"  decode {r['tok_s']:.1f} tok/s", flush=True)
        g = torch.Generator().manual_seed(5)
        for i in range(PROMPTS):
            s0 = torch.cuda.memory_stats()
            dtp = prompt(bl.model, 512, g)
            s1 = torch.cuda.memory_stats()
            d = {k: s1.get(k, 0) - s0.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}
            print(f"  prompt {i}: {512/dtp:7.0f} tok/s {dtp*1e3:7.1f} ms  {d}  reserved {torch.cuda.memory_reserved()/2**30:.2f} GiB", flush=True)
        pr = cProfile.Profile(); pr.enable(); dtp = prompt(bl.model, 512, g); pr.disable()
        print(f"  profiled prompt {dtp*1e3:.1f} ms"); st = pstats.Stats(pr)
        st.sort_stats("tottime").print_stats(12)
        st.sort_stats("cumulative").print_stats("hybridinfer", 14)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as pp:
            dtp = prompt(bl.model, 512, g)
        ev = [(e.name, (e.device_time if hasattr(e, "device_time") else e.cuda_time)) for e in pp.events()]
        cp = sum(t for n, t in ev if "Memcpy" in n) / 1e3; kr = sum(t for n, t in ev if "Memcpy" not in n) / 1e3
        print(f"  GPU copies {cp:.1f} ms, kernels {kr:.1f} ms, of {dtp*1e3:.1f} ms wall", flush=True)
        top = {}
        for n, t in ev: top[n[:50]] = top.get(n[:50], 0) + t
        for n, t in sorted(top.items(), key=lambda kv: -kv[1])[:6]: print(f"    {n:50s} {t/1e3:7.2f} ms")
        del bl
    torch.cuda.empty_cache()
