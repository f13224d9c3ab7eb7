"""Placement solve time at TurboSparse-Mixtral-47B scale (32 layers x 8 experts x 14336 neurons).

A synthetic profile (seeded; per-neuron fire rates ~ U^4, experts reached 10-40% of tokens) stands
in for a real one: the solver's work depends on the shapes, not on the values.
Writes benchmarks/results/plan_47b.json.   Run: python benchmarks/plan_47b.py
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from hybridinfer.bench.workload import random_profile, shape_config
from hybridinfer.placement import plan

GiB = 2**30


def main() -> None:
    cfg = shape_config("M47")[0]
    prof = random_profile(cfg, seed=0)
    rows = []
    for solver in ("milp", "greedy"):
        for budget in (8, 16, 24):
            for pn in (0, 4_900_000_000):       # without / with TurboSparse's ~4.9B predictor parameters
                t = time.perf_counter()
                p = plan(cfg, prof, budget * GiB, context=4096, fmt="q4_0", solver=solver, predictor_numel=pn)
                dt = time.perf_counter() - t
                rows.append({"solver": p.solver, "budget_gib": budget, "predictor_numel": pn, "seconds": round(dt, 3),
                             "gpu_bytes": p.gpu_bytes, "hot_neurons": p.hot_count(),
                             "gpu_share_of_active_bytes": round(p.stats["gpu_share_of_active_bytes"], 4)})
                print(f"{p.solver:<7} {budget:>3} GiB  predictors {pn:>13,}  {dt:6.2f} s  "
                      f"hot {p.hot_count():>9,}  GPU share {p.stats['gpu_share_of_active_bytes']:.1%}")
    out = Path(__file__).parent / "results" / "plan_47b.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "cpus": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
