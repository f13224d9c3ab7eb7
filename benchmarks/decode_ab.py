"""bench decode with each policy measured twice in one process: with one runtime feature
switched off, then as shipped; both results are printed, the JSON keeps the "off" figures under
"ab_off". Same arguments as `python -m hybridinfer.bench.decode`, after the switch:

    python3 benchmarks/decode_ab.py run_ahead --shape M47 --vram-budget 24GiB ...
    python3 benchmarks/decode_ab.py gate_up_q8x --shape M47 --vram-budget 24GiB 8GiB ...

  run_ahead    GraphDecoder.can_run_ahead forced False: one step a token, the host's argmax
               between tokens (results/run_ahead_ab_h100_s9.txt)
  gate_up_q8x  the hot halves' gate_up with the float dots (Q8X=False), not the integer dots
               (results/gate_up_q8x_ab_h100.log)
  route_one    one token's routing by torch (cuBLAS GEMV + softmax + k max reductions: seven
               kernels a layer), not the one-launch Triton kernel (kernels/triton_route.py)
"""
import contextlib
import runpy
import sys

import hybridinfer.bench.decode_measure as dm
from hybridinfer.graphs import GraphDecoder
from hybridinfer.kernels import gpu
from hybridinfer.kernels import triton_ffn as tk


@contextlib.contextmanager
def patched(obj, name, value):
    orig = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, orig)


def float_dots(fmt, d, gt, ut, it, x, act, threshold, mask, sel, a, cfg=None,
               _orig=tk.gate_up_slots):
    cfg = dict(cfg or tk.config(fmt, d, gt.n_max)["gate_up"], Q8X=False)
    return _orig(fmt, d, gt, ut, it, x, act, threshold, mask, sel, a, cfg)


SWITCHES = {"run_ahead": (GraphDecoder, "can_run_ahead", property(lambda self: False)),
            "gate_up_q8x": (tk, "gate_up_slots", float_dots),
            "route_one": (gpu, "route_one", lambda x, router, k: None)}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in SWITCHES:
        raise SystemExit(f"usage: decode_ab.py {{{'|'.join(SWITCHES)}}} [bench decode arguments]")
    name, switch = sys.argv[1], SWITCHES[sys.argv[1]]
    orig = dm.measure

    def both(built, *a, **k):
        import torch._dynamo
        torch._dynamo.reset()          # compile the decode step afresh (route_one is traced in it)
        with patched(*switch):
            off = orig(built, *a, **k)
        torch._dynamo.reset()
        on = orig(built, *a, **k)
        keys = ("tok_s", "ms_token", "split_ms")
        print(f"A/B {name} off:", {x: off[x] for x in keys}, flush=True)
        print(f"A/B {name} on: ", {x: on[x] for x in keys}, flush=True)
        on["ab_off"] = {x: off[x] for x in keys}
        return on
    dm.measure = both
    sys.argv = ["decode"] + sys.argv[2:]
    runpy.run_module("hybridinfer.bench.decode", run_name="__main__")


if __name__ == "__main__":
    main()
