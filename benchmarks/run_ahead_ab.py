"""bench decode with each policy measured twice in one process: run-ahead off (GraphDecoder
.can_run_ahead forced False: one step a token, the host's argmax between tokens), then on."""
import runpy
import sys

import hybridinfer.bench.decode_measure as dm
from hybridinfer.graphs import GraphDecoder

orig = dm.measure


def both(built, *a, **k):
    saved = GraphDecoder.can_run_ahead
    GraphDecoder.can_run_ahead = property(lambda self: False)
    try:
        old = orig(built, *a, **k)
    finally:
        GraphDecoder.can_run_ahead = saved
    new = orig(built, *a, **k)
    keys = ("tok_s", "ms_token", "split_ms", "syncs_per_token", "run_ahead")
    print("A/B off:", {x: old[x] for x in keys}, flush=True)
    print("A/B on: ", {x: new[x] for x in keys}, flush=True)
    new["no_run_ahead"] = {x: old[x] for x in keys}
    return new


dm.measure = both
sys.argv = ["decode"] + sys.argv[1:]
runpy.run_module("hybridinfer.bench.decode", run_name="__main__")
