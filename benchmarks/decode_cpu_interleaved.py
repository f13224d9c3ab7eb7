"""cpu-sparse against cpu-dense decode, interleaved in one process (M7 by default).

`hybridinfer bench decode` measures policies one after another; on a machine shared with other
jobs the load changes between those windows (the dev machine's read bandwidth swings 2-3x), so
the ratio of two sequential figures is noisy. Here both policies are built once (the same
workload, the bench's builders) and decoded in alternating rounds of a few tokens; the median
per policy and the median of the per-round ratios come from the same time windows.

  flock /tmp/hybridinfer-bench.lock python benchmarks/decode_cpu_interleaved.py --shape M7 \
      --threads 2 --rounds 8 --json benchmarks/results/decode_M7_cpu2_interleaved.json

Builds take the workload's profile (bench decode's synthetic_profile), as `bench decode` does:
the cold rows in its frequency order (build.split_rows). A policy named NAME:id is NAME built
without it (rows by neuron id), for an in-process before/after of that order.

--ab-env NAME: a before/after of one build in one process: each policy runs twice a round, with
the environment variable NAME set to 1 ("NAME=1", e.g. a scratch switch the native code reads
per call that turns a change off) and to 0, named policy[NAME=v].
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from hybridinfer.atomic import write_json
from hybridinfer.bench import machine
from hybridinfer.bench.decode_measure import decode, stepper
from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.workload import make_workload, synthetic_profile
from hybridinfer.kernels import cpu


def with_env(name, value, step):
    """step, run with os.environ[name] = value (unchanged when value is None)."""
    if value is None:
        return step

    def run(tok):
        os.environ[name] = value
        return step(tok)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="M7")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4, help="tokens per policy per round")
    p.add_argument("--policies", nargs="+", default=["cpu-sparse", "cpu-dense"],
                   help="policies of bench decode; NAME:id builds NAME with its cold rows by neuron id")
    p.add_argument("--peer", action="store_true",
                   help="also llama.cpp (llama-cpp-python) on the same weights as GGUF, in the rounds")
    p.add_argument("--gguf-dir", default="/tmp")
    p.add_argument("--ab-env", default=None, metavar="NAME",
                   help="run each policy with env NAME=1 and NAME=0 in every round")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cpu.set_num_threads(a.threads)
    bw = machine.read_bandwidth(a.threads)
    machine.release_buffer()
    torch.set_num_threads(1)                 # as bench decode's default --torch-threads
    wl = make_workload(a.shape, a.layers, 0)
    prof = synthetic_profile(wl)
    steps = {}
    states = ["1", "0"] if a.ab_env else [None]
    names = []
    for name in a.policies:
        base, _, tag = name.partition(":")
        b = build(base, wl, torch.device("cpu"), torch.bfloat16, torch.float32,
                  profile=None if tag == "id" else prof)
        cache, step = stepper(b.model, 4 + len(states) * (a.rounds * a.tokens + 3) + 8, False)
        for v in states:
            n = name if v is None else f"{name}[{a.ab_env}={v}]"
            steps[n] = (b, cache, with_env(a.ab_env, v, step))
            decode(steps[n][2], 3)           # warm-up
            names.append(n)
    first = names[0]
    gguf = None
    if a.peer:                               # llama.cpp's decode of the same weights (dense)
        from llama_cpp import Llama

        from hybridinfer.bench.llamacpp_peer import write_gguf
        gguf = write_gguf(wl, os.path.join(a.gguf_dir, f"interleaved-{a.shape}.gguf"))
        llm = Llama(model_path=gguf, n_ctx=512, n_threads=a.threads, n_threads_batch=a.threads,
                    n_gpu_layers=0, verbose=False)
        llm.eval([1])

        def peer_step(tok):
            llm.eval([300 + tok % 1000])
            return torch.zeros(1)
        decode(peer_step, 3)
        steps["llama.cpp"] = (None, None, peer_step)
        names.append("llama.cpp")
    per = {n: [] for n in names}             # seconds per token, every token
    rounds = []                              # per round: median s/token of each policy
    for _ in range(a.rounds):
        r = {}
        for n in names:
            s = decode(steps[n][2], a.tokens)
            per[n] += s
            r[n] = statistics.median(s)
        rounds.append(r)
    out = {"command": " ".join(sys.argv), "machine": machine.machine_info(a.threads), "ab_env": a.ab_env,
           "cpu_read_gbs": bw, "shape": a.shape, "layers": wl.cfg.num_layers,
           "rounds": a.rounds, "tokens_per_round": a.tokens, "per_round_s": rounds,
           "tok_s": {n: 1 / statistics.median(v) for n, v in per.items()}}
    for n in names[1:]:
        out[f"ratio_{first}_over_{n}"] = statistics.median(r[n] / r[first] for r in rounds)
    print(f"{a.shape} ({wl.cfg.num_layers} layers), {a.threads} threads, read {bw:.1f} GB/s, "
          f"loadavg {out['machine'].get('loadavg')}")
    for n, v in out["tok_s"].items():
        print(f"  {n}: {v:.2f} tok/s (median of {len(per[n])} tokens)")
    for k, v in out.items():
        if k.startswith("ratio_"):
            print(f"  {k}: {v:.2f} (median of per-round ratios)")
    if gguf:
        os.remove(gguf)
    if a.json:
        write_json(a.json, out)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
