"""The CPU kernels' thread pool when another process takes a core: one kernel call (a q4_0
`linear`, the benchmark predictor's fc1 shape by default) at 1 and N threads, on a quiet machine
and with a busy-looping process beside it (started by this script, one per --busy).

    python benchmarks/pool_contention.py [--threads 2] [--rows 1024] [--cols 4096] [--busy 1]
                                         [--calls 200] [--so COPY_OF_A_BUILD/_C....so]

Prints mean / median / p90 of back-to-back calls. Under contention the times are bimodal: a
call that waits for a preempted thread takes a scheduler time slice (~1.3 ms here), so read
the mean (what a run of calls costs) and the p90, not the median alone.

Until 42888f4 ThreadPool::run returned when EVERY worker had run the job: a worker whose core was
taken joined a time slice late and the whole call waited for it, though the work is claimed
dynamically. Now (csrc/threadpool.h) a job is open only while the caller runs its share; workers
enter while it is open, and the caller waits only for those that entered (one still inside a
claimed chunk when preempted is still waited for). Figures and commands:
benchmarks/results/pool_contention_dev2core.txt.
"""
import argparse
import multiprocessing as mp
import statistics
import time

import torch

cpu = None   # hybridinfer.kernels.cpu, imported by main() after --so is applied


def _spin(stop):
    while not stop.is_set():
        pass


def _time_calls(x, m, n=200) -> tuple[float, float, float]:
    """(mean, median, 90th percentile) seconds of n back-to-back calls: under contention the
    times are bimodal (a call that waits for a preempted thread takes a scheduler time slice),
    so the median alone can hide what a run of calls (a decode step) costs."""
    cpu.linear(x, m)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        cpu.linear(x, m)
        out.append(time.perf_counter() - t)
    return statistics.fmean(out), statistics.median(out), statistics.quantiles(out, n=10)[-1]


def _import_kernels(so):
    global cpu
    if so:   # registered as hybridinfer._C before anything imports the installed one
        import importlib.util
        import sys
        spec = importlib.util.spec_from_file_location("hybridinfer._C", so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["hybridinfer._C"] = mod
    from hybridinfer.kernels import cpu as c
    cpu = c
    print(f"build: {cpu._native().__file__}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="the pool's size besides 1")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--busy", type=int, default=1, help="busy-looping processes in the loaded case")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per figure")
    ap.add_argument("--so", default=None, metavar="PATH",
                    help="use this build of the extension (a copied hybridinfer/_C*.so) instead "
                         "of the installed one: A/B of two builds, run alternately")
    a = ap.parse_args()
    _import_kernels(a.so)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = cpu.PackedLinear.from_weight(torch.randn(a.rows, a.cols) * 0.05, "q4_0")
    x = torch.randn(a.cols)
    print(f"q4_0 linear {a.rows} x {a.cols} ({m.nbytes / 1e6:.2f} MB), {a.calls} calls, "
          "us as mean / median / p90:")
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
            res[t] = [v * 1e6 for v in _time_calls(x, m, a.calls)]
        stop.set()
        for p in procs:
            p.join()
        print(f"  {label:20s} " + "   ".join(f"{t} thread(s) " + " / ".join(f"{u:.0f}" for u in v)
                                              for t, v in res.items()))


if __name__ == "__main__":
    main()
