"""bench decode with each policy measured twice in one process: the hot halves' gate_up with
float dots (Q8X=False), then with the integer dots (the default), everything else the same.
Same arguments as `python -m hybridinfer.bench.decode`."""
import runpy
import sys

import hybridinfer.bench.decode_measure as dm
from hybridinfer.kernels import triton_ffn as tk

orig, gate_up_slots = dm.measure, tk.gate_up_slots


def float_dots(fmt, d, gt, ut, it, x, act, threshold, mask, sel, a, cfg=None):
    cfg = dict(cfg or tk.config(fmt, d, gt.n_max)["gate_up"], Q8X=False)
    return gate_up_slots(fmt, d, gt, ut, it, x, act, threshold, mask, sel, a, cfg)


def both(built, *a, **k):
    tk.gate_up_slots = float_dots
    try:
        off = orig(built, *a, **k)
    finally:
        tk.gate_up_slots = gate_up_slots
    on = orig(built, *a, **k)
    keys = ("tok_s", "ms_token", "split_ms")
    print("A/B float dots:", {x: off[x] for x in keys}, flush=True)
    print("A/B q8x dots:  ", {x: on[x] for x in keys}, flush=True)
    on["gate_up_float_dots"] = {x: off[x] for x in keys}
    return on


dm.measure = both
sys.argv = ["decode"] + sys.argv[1:]
runpy.run_module("hybridinfer.bench.decode", run_name="__main__")
