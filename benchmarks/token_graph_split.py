"""The chained token as one CUDA graph or as pieces of doubling length (graphs.token_pieces),
A/B in one process on one build (GPU machine): M47 hybrid at a budget, interleaved rounds.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 benchmarks/token_graph_split.py \\
        [--layers 32] [--budget 24GiB] [--rounds 4] [--tokens 24]

Prints per variant the median ms/token and the host's time in graph launches per token (the
launch of a graph costs the host about 0.6 us a node; one graph of 32 layers has ~800).
"""
import argparse
import statistics
import time

import torch

from hybridinfer.bench.decode_measure import decode
from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.workload import make_workload, synthetic_profile
from hybridinfer.budget import parse_budget
from hybridinfer.graphs import GraphDecoder, token_pieces
from hybridinfer.kernels import cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--budget", default="24GiB", help="the full model's budget (scaled to --layers)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24, help="timed tokens per variant and round")
    ap.add_argument("--threads", type=int, default=8)
    a = ap.parse_args()
    cpu.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    wl = make_workload("M47", a.layers, 0)
    b = build("hybrid", wl, dev, dt, dt, int(parse_budget(a.budget) * a.layers / 32),
              synthetic_profile(wl), 1024)
    gd = GraphDecoder(b.model, 1024)
    assert gd._chained, "the hybrid at this budget does not run the chained step"
    launch = [0.0]
    replay = torch.cuda.CUDAGraph.replay

    def timed_replay(g):
        t = time.perf_counter()
        replay(g)
        launch[0] += time.perf_counter() - t
    torch.cuda.CUDAGraph.replay = timed_replay
    variants = {"whole": token_pieces(a.layers, whole=True), "pieces": token_pieces(a.layers)}
    res = {k: ([], []) for k in variants}
    for r in range(a.rounds):
        for name, pieces in variants.items():
            gd.capture_token(pieces)
            gd.cache.length = 0
            decode(gd.step, 4, seed=100 + r)                      # warm-up
            launch[0] = 0.0
            secs = decode(gd.step, a.tokens, seed=r)
            res[name][0].extend(secs)
            res[name][1].append(launch[0] / a.tokens)
    print(f"M47 x {a.layers} layers, hybrid at {a.budget} (scaled), {torch.cuda.get_device_name()}, "
          f"{a.rounds} rounds x {a.tokens} tokens, interleaved")
    for name, (secs, launches) in res.items():
        print(f"  {name:7s} ({len(variants[name])} graphs): {statistics.median(secs) * 1e3:.3f} ms/token, "
              f"graph launches {statistics.median(launches) * 1e3:.3f} ms/token")
    w, p = (statistics.median(res[k][0]) for k in ("whole", "pieces"))
    print(f"  pieces / whole: {p / w:.3f}")


if __name__ == "__main__":
    main()
