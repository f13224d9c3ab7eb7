"""Where a 512-token M47 prompt's host time goes, GPU machine, one policy per process:

    python3 benchmarks/prefill_profile.py hybrid@24GiB [--prompts 6] [--profile] [--top 40]

Builds the policy as bench decode does, runs two warm-up prompts, then times --prompts prompts
(wall and host issue time: until the forward returns, before the final synchronize) and prints
their median. --profile then profiles one prompt twice: cProfile (the Python functions and
torch's builtins, by own time) and torch.profiler (CPU side only: how many aten ops and CUDA
launches a prompt issues, and their host time).
"""
import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from hybridinfer.bench.decode_measure import vram_cap
from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.workload import make_workload, synthetic_profile
from hybridinfer.budget import parse_budget
from hybridinfer.kernels import cpu


def prompt(model, dev, seed: int, issue: list | None = None) -> float:
    """One 512-token prompt's wall time (s); its host issue time is appended to `issue`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 512), generator=g).to(dev)
    cache = model.new_cache(513)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        model(ids, cache, last_only=True)
    if issue is not None:
        issue.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policy", help="POLICY@BUDGET, e.g. hybrid@24GiB")
    ap.add_argument("--prompts", type=int, default=6, help="timed prompts (after two warm-ups)")
    ap.add_argument("--profile", action="store_true", help="then profile one prompt (cProfile, torch.profiler)")
    ap.add_argument("--top", type=int, default=40, help="rows of each profile table")
    a = ap.parse_args()
    if "@" not in a.policy:
        ap.error("policy: POLICY@BUDGET, e.g. hybrid@24GiB")
    name, b = a.policy.split("@")
    cpu.set_num_threads(8)
    torch.set_num_threads(8)
    dev, dt = torch.device("cuda"), torch.bfloat16
    wl = make_workload("M47", None, 0)
    budget = int(parse_budget(b))
    with vram_cap(dev, budget):
        bl = build(name, wl, dev, dt, dt, budget, synthetic_profile(wl), 4096, "auto")
        print(f"=== {a.policy}: {bl.note}", flush=True)
        for s in range(2):
            print(f"  warm-up prompt {s}: {prompt(bl.model, dev, s) * 1e3:.1f} ms", flush=True)
        walls, issue = [], []
        for s in range(a.prompts):
            walls.append(prompt(bl.model, dev, 10 + s, issue))
        print("  prompts (wall / host issue, ms): " + "  ".join(
            f"{w * 1e3:.1f}/{i * 1e3:.1f}" for w, i in zip(walls, issue)), flush=True)
        med = statistics.median(walls)
        print(f"  median {med * 1e3:.1f} ms = {512 / med:.0f} tok/s; median host issue "
              f"{statistics.median(issue) * 1e3:.1f} ms", flush=True)
        if not a.profile:
            return
        pr = cProfile.Profile()
        pr.enable()
        t = prompt(bl.model, dev, 7)
        pr.disable()
        print(f"  cProfile'd prompt: {t * 1e3:.1f} ms", flush=True)
        for key in ("tottime", "cumtime"):
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats(key).print_stats(a.top)
            print(f"--- cProfile by {key}\n{s.getvalue()}", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            t = prompt(bl.model, dev, 9)
        print(f"--- torch.profiler (CPU side), prompt {t * 1e3:.1f} ms", flush=True)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top), flush=True)

if __name__ == "__main__":
    main()
