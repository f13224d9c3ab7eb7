"""`hybridinfer bench kernels`: workload K of BENCHMARKS.md.

One FFN (hidden 4096, intermediate 14336, dReLU), weights f16 and q4_0 (by default), active
density 100/25/10/5 %, the CPU kernel (ffn_sparse, exact=False: every given id reads its three
rows) at each thread count. In the same run: the STREAM-like read bandwidth at the same thread
count, and torch's dense CPU FFN (F.linear x 3) on the same machine.

Honesty measures: every timed call starts with the last-level cache flushed (a read of a buffer
>= 4x the LLC) and uses the next of several weight copies and a fresh random id set (sorted, as
a mask's nonzero() gives it), so no call finds its rows in cache. Figures: median seconds,
effective GB/s = bytes the op must read (k x 3 rows) / seconds, ratio = that / read bandwidth.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from hybridinfer import quant
from hybridinfer.bench import machine
from hybridinfer.atomic import write_json
from hybridinfer.kernels import cpu

D_MODEL, N_FF = 4096, 14336
POOL_BYTES = 1 << 30  # weight copies to rotate through (>= 2 copies)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts to measure (default: 1 and all CPUs)")
    parser.add_argument("--json", metavar="FILE", help="write figures + machine info here")
    parser.add_argument("--formats", nargs="+", default=["f16", "q4_0"], choices=quant.FORMATS)
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.25, 0.1, 0.05])
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per figure")
    parser.add_argument("--d-model", type=int, default=D_MODEL)
    parser.add_argument("--n-ff", type=int, default=N_FF)
    parser.add_argument("--no-torch", action="store_true", help="skip torch's dense baseline")
    parser.add_argument("--cold-path", action="store_true",
                        help="do not warm the call path after the cache flush")


def random_packed(fmt: str, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """A valid packed [n, d] matrix, fast: random payload bytes with sane block scales."""
    if fmt in ("f32", "f16", "bf16"):
        return quant.pack(torch.randn(n, d, generator=gen) * d ** -0.5, fmt)
    bb = 34 if fmt == "q8_0" else 18
    p = torch.randint(0, 256, (n, d // 32, bb), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, d // 32, generator=gen) + 0.5) * 0.01
    p[..., :2] = scale.to(torch.float16).view(torch.uint8).reshape(n, d // 32, 2)
    return p.reshape(n, -1)


def _copies(fmt: str, d: int, n: int, gen: torch.Generator) -> list:
    mats = [random_packed(fmt, n, d, gen) for _ in range(3)]
    count = max(2, math.ceil(POOL_BYTES / (3 * mats[0].numel())))
    # Weights live where the runtime puts them: cpu.to_weights (huge pages where allowed).
    return [cpu.PackedFFN(fmt, d, n, *(cpu.to_weights(m) for m in mats)) for _ in range(count)]


def _timed(fn, repeat: int, warm=None) -> list[float]:
    """Seconds of fn(r) for r = 1..repeat, each after an LLC flush and then warm(r) (if given)."""
    out = []
    for r in range(repeat + 1):  # the first call warms the pool and is dropped
        machine.flush_caches()
        if warm is not None:
            warm(r)
        t = time.perf_counter()
        fn(r)
        dt = time.perf_counter() - t
        if r:
            out.append(dt)
    return out


def _torch_dense(dtype, d, n, threads, repeat, gen) -> float:
    """Median seconds of torch's dense FFN (dReLU) with weights in `dtype`, cold cache."""
    one = [torch.randn(n, d, generator=gen).to(dtype) for _ in range(3)]
    per = 3 * one[0].numel() * one[0].element_size()
    sets = [one] + [[w.clone() for w in one] for _ in range(max(2, math.ceil(POOL_BYTES / per)) - 1)]
    x = torch.randn(1, d, generator=gen).to(dtype)
    torch.set_num_threads(threads)

    def call(r):
        w1, w3, w2t = sets[r % len(sets)]
        a = torch.relu(F.linear(x, w1)) * torch.relu(F.linear(x, w3))
        return a @ w2t

    with torch.inference_mode():
        return statistics.median(_timed(call, repeat))


def run(args: argparse.Namespace) -> int:
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    d, n = args.d_model, args.n_ff
    gen = torch.Generator().manual_seed(0)
    bw = {}
    for t in threads:
        bw[t] = machine.read_bandwidth(t)
        print(f"read bandwidth, {t} thread(s): {bw[t]:.1f} GB/s", flush=True)

    torch_s: dict = {}
    if not args.no_torch:
        for t in threads:
            for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)):
                torch_s.setdefault(name, {})[t] = _torch_dense(dt, d, n, t, max(3, args.repeat // 2), gen)
                print(f"torch dense {name}, {t} thread(s): {torch_s[name][t] * 1e3:.2f} ms", flush=True)
    best_torch = {t: min(v[t] for v in torch_s.values()) for t in threads} if torch_s else {}

    rows = []
    print(f"\n{'format':6} {'density':>7} {'thr':>3} {'ms':>8} {'GB/s':>7} {'ratio':>6} "
          f"{'x torch':>8}", flush=True)
    for fmt in args.formats:
        copies = _copies(fmt, d, n, gen)
        rb = quant.row_bytes(d, fmt)
        x = torch.randn(d, generator=gen)
        for t in threads:
            cpu.set_num_threads(t)
            for dens in args.densities:
                k = max(1, round(dens * n))
                id_sets = [torch.randperm(n, generator=gen)[:k].sort().values.to(torch.int32)
                           for _ in range(args.repeat + 1)]
                # After the flush, a 1-id call on another copy warms the call path (Python, torch
                # allocator, pool, x) as the previous layer would in decode; the timed copy's
                # weights stay cold. --cold-path skips it (then ~0.2 ms of cache misses in the
                # software stack land on every call).
                warm = None if args.cold_path else (
                    lambda r: cpu.ffn_sparse(copies[(r + 1) % len(copies)], x, id_sets[r][:1]))
                secs = _timed(lambda r: cpu.ffn_sparse(copies[r % len(copies)], x, id_sets[r]),
                              args.repeat, warm)
                s = statistics.median(secs)
                gbs = 3 * k * rb / s / 1e9
                row = {"format": fmt, "density": dens, "threads": t, "k": k, "seconds": s,
                       "seconds_min": min(secs), "gbs": gbs, "ratio": gbs / bw[t],
                       "read_gbs": bw[t]}
                if best_torch:
                    row["speedup_vs_torch"] = best_torch[t] / s
                rows.append(row)
                print(f"{fmt:6} {dens:7.2f} {t:3d} {s * 1e3:8.2f} {gbs:7.1f} {gbs / bw[t]:6.2f} "
                      f"{row.get('speedup_vs_torch', float('nan')):8.2f}", flush=True)
        copies = None        # this format's weight copies freed before the next format's

    print()
    for fmt in args.formats:
        for t in threads:
            dense = [r for r in rows if r["format"] == fmt and r["threads"] == t and r["density"] == 1.0]
            ten = [r for r in rows if r["format"] == fmt and r["threads"] == t and r["density"] == 0.1]
            if dense and ten:
                print(f"{fmt} {t} thread(s): time at 10% / dense = "
                      f"{ten[0]['seconds'] / dense[0]['seconds']:.3f}")
    if args.json:
        out = {
            "benchmark": "K (kernels)",
            "machine": machine.machine_info(threads),
            "shape": {"d_model": d, "n_ff": n, "activation": "drelu", "exact": False, "batch": 1},
            "read_bandwidth_gbs": bw[max(threads)],
            "read_bandwidth_gbs_by_threads": {str(t): v for t, v in bw.items()},
            "torch_dense_seconds": {k2: {str(t): s for t, s in v.items()} for k2, v in torch_s.items()},
            "call_path": "cold" if args.cold_path else "warmed by a 1-id call on another copy",
            "method": "median of --repeat cold-cache calls; fresh sorted random ids per call; "
                      "gbs = k*3*row_bytes/seconds; ratio = gbs/read_gbs at the same threads; "
                      "speedup_vs_torch = fastest torch dense FFN (f32/bf16/f16) / seconds",
            "rows": rows,
        }
        write_json(args.json, out)
        print(f"wrote {args.json}")
    machine.release_buffer()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
