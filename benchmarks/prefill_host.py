"""Is a 512-token prompt of M47 host-bound? One policy per process (two builds at 24 GiB do not
fit beside each other under the VRAM cap), GPU machine:

    python3 benchmarks/prefill_host.py hybrid@24GiB
    python3 benchmarks/prefill_host.py dense-offload@24GiB

Per prompt: the wall time, the host's issue time (until the forward returns, before the final
synchronize) and the time the host waited for the device at the MoE layers' syncs (one a layer,
ffn.expert_groups, timed by a synchronize just before it). Waits near zero: the device waits for
the host (host-bound). Four prompts right after the build (the first compiles), a decode
measurement as bench decode makes it, four more prompts, then bench decode's own prefill figure
(decode_measure._prefill: the median of 3 prompts after a warm-up).
"""
import sys
import time

import torch

import hybridinfer.ffn as ffn
from hybridinfer.bench.decode_measure import _prefill, measure, vram_cap
from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.workload import make_workload, synthetic_profile
from hybridinfer.budget import parse_budget
from hybridinfer.kernels import cpu

WAIT = {"s": 0.0, "n": 0}
_groups = ffn.expert_groups


def timed_groups(w, ids, n):
    t = time.perf_counter()
    torch.cuda.synchronize()
    WAIT["s"] += time.perf_counter() - t
    WAIT["n"] += 1
    return _groups(w, ids, n)


def prompts(model, k: int, tag: str, dev) -> None:
    g = torch.Generator().manual_seed(5)
    for i in range(k):
        ids = torch.randint(0, model.cfg.vocab_size, (1, 512), generator=g).to(dev)
        cache = model.new_cache(513)
        torch.cuda.synchronize()
        WAIT.update(s=0.0, n=0)
        t = time.perf_counter()
        with torch.inference_mode():
            model(ids, cache, last_only=True)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"  {tag} prompt {i}: {(t2 - t) * 1e3:7.1f} ms, host issue {(t1 - t) * 1e3:7.1f} ms, "
              f"waits {WAIT['s'] * 1e3:5.1f} ms at {WAIT['n']} syncs", flush=True)
        del cache


def main():
    if len(sys.argv) != 2 or "@" not in sys.argv[1]:
        raise SystemExit("usage: prefill_host.py POLICY@BUDGET (e.g. hybrid@24GiB)")
    name, b = sys.argv[1].split("@")
    cpu.set_num_threads(8)
    torch.set_num_threads(8)
    dev, dt = torch.device("cuda"), torch.bfloat16
    wl = make_workload("M47", None, 0)
    ffn.expert_groups = timed_groups               # HybridMoE / MoE look it up at call time
    budget = int(parse_budget(b))
    with vram_cap(dev, budget):
        bl = build(name, wl, dev, dt, dt, budget, synthetic_profile(wl), 4096, "auto")
        print(f"=== {name}@{b}", flush=True)
        prompts(bl.model, 4, "fresh", dev)
        r = measure(bl, 2, 3, 0, 4096, graphs=True)
        print(f"  decode {r['tok_s']:.1f} tok/s", flush=True)
        prompts(bl.model, 4, "after decode", dev)
        print(f"  bench decode's prefill (median of 3 after a warm-up): "
              f"{_prefill(bl.model, 512, dev):.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
