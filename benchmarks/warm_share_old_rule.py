"""bench decode with the warm tier's "auto" rule as it was before COLD_CPU_FIXED_S (budget.py): the
balance of the CPU's and the PCIe reads' time only, never all warm at a large budget. For A/Bs in one
run (benchmarks/results/warm_share_rule_h100.txt):

    python3 benchmarks/warm_share_old_rule.py --shape M47 --policies hybrid --vram-budget 16GiB ...

takes bench decode's arguments."""
import runpy
import sys

import hybridinfer.budget as b
import hybridinfer.placement as p


def old(nbytes: float) -> float:
    if nbytes <= 0:
        return 0.0
    t_cpu, t_pcie = nbytes / b.COLD_CPU_GBS, nbytes / b.ZERO_COPY_GBS
    return min(1.0, max(0.0, (t_cpu - b.PCIE_LATENCY_S) / (t_cpu + t_pcie)))


b.balanced_share = p.balanced_share = old
sys.argv = ["decode"] + sys.argv[1:]
runpy.run_module("hybridinfer.bench.decode", run_name="__main__")
