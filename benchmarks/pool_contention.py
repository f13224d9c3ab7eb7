"""The CPU kernels' thread pool when another process takes a core: one kernel call (a q4_0
`linear`, the benchmark predictor's fc1 shape by default) at 1 and N threads, on a quiet machine
and with a busy-looping process beside it (started by this script, one per --busy).

    python benchmarks/pool_contention.py [--threads 2] [--rows 1024] [--cols 4096] [--busy 1]

ThreadPool::run returns when every worker has run the job (csrc/threadpool.cpp): a worker whose
core is taken by another process joins a scheduler time slice late, and the whole call waits for
it even though the work is claimed dynamically (the caller could have done it alone).
"""
import argparse
import multiprocessing as mp
import statistics
import time

import torch

from hybridinfer.kernels import cpu


def _spin(stop):
    while not stop.is_set():
        pass


def _time_calls(x, m, n=200) -> float:
    cpu.linear(x, m)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        cpu.linear(x, m)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="the pool's size besides 1")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--busy", type=int, default=1, help="busy-looping processes in the loaded case")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = cpu.PackedLinear.from_weight(torch.randn(a.rows, a.cols) * 0.05, "q4_0")
    x = torch.randn(a.cols)
    print(f"q4_0 linear {a.rows} x {a.cols} ({m.nbytes / 1e6:.2f} MB), median of 200 calls, us:")
    for label in ("quiet", f"{a.busy} busy process(es)"):
        stop, procs = mp.Event(), []
        if label != "quiet":
            procs = [mp.Process(target=_spin, args=(stop,)) for _ in range(a.busy)]
            for p in procs:
                p.start()
            time.sleep(0.5)
        res = {}
        for t in (1, a.threads):
            cpu.set_num_threads(t)
            res[t] = _time_calls(x, m) * 1e6
        stop.set()
        for p in procs:
            p.join()
        print(f"  {label:22s} " + "  ".join(f"{t} thread(s) {v:8.0f}" for t, v in res.items()))


if __name__ == "__main__":
    main()
