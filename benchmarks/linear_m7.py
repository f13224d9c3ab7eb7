"""The CPU decode's dense linears at M7 shapes (Mistral-7B: d 4096, 32 heads, 8 KV heads,
head_dim 128, vocab 32000), q4_0 grouped rows as the runtime packs them, one token: where the
"linear" part of `bench decode`'s CPU split goes.

Figures, per thread count (1 and 2 by default), against the read probe of that count
(machine.read_bandwidth):
  cold   one call after an LLC flush: q 4096 x 4096, k / v 1024 x 4096, o 4096 x 4096, the
         stacked qkv 6144 x 4096 the runtime calls (kernels.cpu.stacked_linears) and lm_head
         32000 x 4096; median of --repeat calls over rotating copies;
  sweep  what a decode token does: every layer's qkv then o (32 layers, 755 MB, no flush: each
         layer's rows are cold by then) and lm_head, back to back; median seconds of a sweep;
  call   the cost of one call on a hot 8 x 4096 matrix (pool hand-off, x preparation).
GB/s = packed bytes the call reads / seconds; "probe" = that / the read probe.

    flock /tmp/hybridinfer-bench.lock python benchmarks/linear_m7.py [--threads 1 2] [--repeat 9]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from hybridinfer import quant
from hybridinfer.atomic import write_json
from hybridinfer.bench import machine
from hybridinfer.bench.kernels import random_packed
from hybridinfer.kernels import cpu

D, HD, H, KV, VOCAB, LAYERS = 4096, 128, 32, 8, 32000, 32


def packed(rows: int, g: torch.Generator) -> cpu.PackedLinear:
    """A random q4_0 [rows, D] matrix in grouped rows (as PackedLinear.from_weight packs q4_0)."""
    w = cpu.to_weights(quant.group_q4_0(random_packed("q4_0", rows, D, g)))
    return cpu.PackedLinear("q4_0", D, rows, w, True)


def timed(fn, repeat: int, flush: bool) -> float:
    """Median seconds of fn(r), r = 1..repeat (a first call warms up and is dropped)."""
    out = []
    for r in range(repeat + 1):
        if flush:
            machine.flush_caches()
        t = time.perf_counter()
        fn(r)
        if r:
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(D, generator=g)
    layers = [(packed((H + 2 * KV) * HD, g), packed(D, g)) for _ in range(LAYERS)]   # qkv, o
    lm_head = [packed(VOCAB, g) for _ in range(2)]
    qkv0 = layers[0][0]
    # q / k / v alone: row views of the stacked matrices (as stacked_linears' views)
    def part(m, r0, r1):
        return cpu.PackedLinear("q4_0", D, r1 - r0, m.weight[r0:r1], True)
    singles = {
        "q": [part(q, 0, H * HD) for q, _ in layers],
        "k": [part(q, H * HD, (H + KV) * HD) for q, _ in layers],
        "v": [part(q, (H + KV) * HD, (H + 2 * KV) * HD) for q, _ in layers],
        "qkv": [q for q, _ in layers],
        "o": [o for _, o in layers],
        "lm_head": lm_head,
    }
    small = packed(8, g)
    out = {"command": " ".join(sys.argv), "machine": machine.machine_info(max(a.threads)),
           "repeat": a.repeat, "by_threads": {}}
    sweep_bytes = sum(q.weight.numel() + o.weight.numel() for q, o in layers) + lm_head[0].weight.numel()
    for t in a.threads:
        bw = machine.read_bandwidth(t)
        cpu.set_num_threads(t)
        res = {"read_gbs": bw, "loadavg": open("/proc/loadavg").read().split()[:3]}
        print(f"threads {t}: read probe {bw:.1f} GB/s, loadavg {res['loadavg']}")
        for name, ms in singles.items():
            s = timed(lambda r: cpu.linear(x, ms[r % len(ms)]), a.repeat, True)
            nb = ms[0].weight.numel()
            res[name] = {"ms": s * 1e3, "gbs": nb / s / 1e9, "probe": nb / s / 1e9 / bw}
            print(f"  cold {name:8s} {ms[0].out_features:6d} x {D}: {s * 1e3:7.3f} ms "
                  f"{nb / s / 1e9:5.1f} GB/s {nb / s / 1e9 / bw:.2f} of the probe")

        def sweep(_):
            for q, o in layers:
                cpu.linear(x, q)
                cpu.linear(x[:D], o)
            cpu.linear(x, lm_head[0])
        s = timed(sweep, a.repeat, True)
        res["sweep"] = {"ms": s * 1e3, "gbs": sweep_bytes / s / 1e9, "probe": sweep_bytes / s / 1e9 / bw}
        print(f"  sweep {LAYERS} x (qkv, o) + lm_head, {sweep_bytes / 1e6:.0f} MB: {s * 1e3:.2f} ms "
              f"{sweep_bytes / s / 1e9:5.1f} GB/s {sweep_bytes / s / 1e9 / bw:.2f} of the probe")
        n = 2000
        c = timed(lambda _: [cpu.linear(x, small) for _ in range(n)], 3, False) / n
        res["call_us"] = c * 1e6
        print(f"  call (8 x {D}, hot): {c * 1e6:.1f} us")
        out["by_threads"][str(t)] = res
    y = cpu.linear(x, qkv0)
    ref = quant.unpack(quant.ungroup_q4_0(qkv0.weight), "q4_0", D).double() @ x.double()
    print(f"check: qkv max |y - W x| / max |W x| = {float((y.double() - ref).abs().max() / ref.abs().max()):.2g}")
    machine.release_buffer()
    if a.json:
        write_json(a.json, out)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
