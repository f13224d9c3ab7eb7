"""Where a 512-token M47 prompt's host time goes, GPU machine, one policy per process:

    python3 benchmarks/prefill_profile.py hybrid@24GiB [--prompts 6] [--profile] [--top 40]

Builds the policy as bench decode does, runs two warm-up prompts, then times --prompts prompts
(wall and host issue time: until the forward returns, before the final synchronize) and prints
their median. --profile then profiles one prompt twice: cProfile (the Python functions and
torch's builtins, by own time) and torch.profiler (CPU side only: how many aten ops and CUDA
launches a prompt issues, and their host time). --timeline traces one prompt's GPU side
instead (torch.profiler with CUDA activity): per stream the busy time, the union of all streams'
busy time against the prompt's span, the compute stream's idle gaps, and the kernels by total time.
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import tempfile
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


def _union(iv: list) -> float:
    """Total length (us) of the union of intervals [(start, end)]."""
    tot, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(iv):
        if cur_e is None or s > cur_e:
            tot += 0.0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return tot + (0.0 if cur_e is None else cur_e - cur_s)


def timeline(model, dev, top: int) -> None:
    """One prompt's GPU side from a chrome trace: busy time per stream, the union against the
    span, the compute stream's gaps, the kernels by total time."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as p:
        t = prompt(model, dev, 11)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    p.export_chrome_trace(path)
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    os.remove(path)
    gpu = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not gpu:
        print("--- timeline: no GPU events recorded", flush=True)
        return
    span0 = min(e["ts"] for e in gpu)
    span = max(e["ts"] + e["dur"] for e in gpu) - span0
    streams = {}
    for e in gpu:
        streams.setdefault(e.get("args", {}).get("stream", -1), []).append(e)
    print(f"--- GPU timeline of one prompt ({t * 1e3:.1f} ms wall): span {span / 1e3:.1f} ms, busy on "
          f"any stream {_union([(e['ts'], e['ts'] + e['dur']) for e in gpu]) / 1e3:.1f} ms", flush=True)
    for sid, es in sorted(streams.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        kinds = {}
        for e in es:
            kinds[e["cat"]] = kinds.get(e["cat"], 0.0) + e["dur"]
        print(f"  stream {sid}: {len(es)} ops, " + ", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in kinds.items()),
              flush=True)
    main_es = max(streams.values(), key=len)          # the compute stream: the most ops
    iv = sorted((e["ts"], e["ts"] + e["dur"]) for e in main_es)
    gaps, end = [], iv[0][1]
    for s, e in iv[1:]:
        if s > end:
            gaps.append(s - end)
        end = max(end, e)
    for lo, hi in ((0, 10), (10, 100), (100, 1000), (1000, 1e12)):
        g = [x for x in gaps if lo <= x < hi]
        print(f"  compute stream's gaps {lo:g}-{hi:g} us: {len(g)}, {sum(g) / 1e3:.1f} ms", flush=True)
    names = {}
    for e in gpu:
        n = e["name"][:70]
        c, d = names.get(n, (0, 0.0))
        names[n] = (c + 1, d + e["dur"])
    print("  by total time:", flush=True)
    for n, (c, d) in sorted(names.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"    {d / 1e3:8.2f} ms {c:6d}x  {n}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policy", help="POLICY@BUDGET, e.g. hybrid@24GiB")
    ap.add_argument("--prompts", type=int, default=6, help="timed prompts (after two warm-ups)")
    ap.add_argument("--profile", action="store_true", help="then profile one prompt (cProfile, torch.profiler)")
    ap.add_argument("--timeline", action="store_true", help="then trace one prompt's GPU side")
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
        if a.timeline:
            timeline(bl.model, dev, a.top)
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
