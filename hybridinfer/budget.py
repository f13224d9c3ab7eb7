"""The planner's two knobs as users give them: the VRAM budget ("16GiB", "0.8", "auto") and the
warm tier's PCIe share ("auto" or 0..1), parsed and validated, with the rules "auto" follows.
placement.plan takes their values."""
from __future__ import annotations

import re

from .errors import HybridInferError

AUTO_MARGIN = (512 << 20, 0.05)   # "auto" leaves max(512 MiB, 5% of free VRAM) for the allocator, scratch
# The warm tier's "auto" share balances, per FFN, the CPU's time for its cold rows against the
# GPU's for reading the warm ones over PCIe, per call of the FFN with B expected non-hot bytes:
#   CPU: (1 - s) B / COLD_CPU_GBS      GPU: PCIE_LATENCY_S + s B / ZERO_COPY_GBS
# s = (B / COLD_CPU_GBS - PCIE_LATENCY_S) / (B / COLD_CPU_GBS + B / ZERO_COPY_GBS), in 0..1.
# Measured on the H100 machine (8 threads): the CPU's cold half in decode ~21 GB/s
# (decode_M47_h100_v11), zero-copy row reads ~34 GB/s (zero_copy_rows_h100_v2), and the warm
# kernels' fixed cost ~25-35 us a layer (profile_step at 24 GiB: +34 us of GPU time for 0.36 MB).
# A CPU half also costs COLD_CPU_FIXED_S a call however few its rows (the cold step's own cost and
# the device's flag round trip: cold_step_latency_gpumachine, 16 rows 28 us vs 5 us empty, and the
# GPU's await of ~35-45 us a layer at 24 GiB), so the balanced split is weighed against making
# every non-hot row warm (share 1: no CPU half, no wait): at 24 GiB (8 layers, scaled) that was
# 1.56-1.62 vs 1.69-2.04 ms a token (session 8; a fixed share of 0.6, both paths, had been 10%
# slower than none). Small B therefore goes all warm, large B keeps the balance.
COLD_CPU_GBS, ZERO_COPY_GBS, PCIE_LATENCY_S = 21e9, 34e9, 30e-6
COLD_CPU_FIXED_S = 40e-6
PCIE_SHARE_CUDA = "auto"   # the runtime's default warm share on a CUDA device (0 elsewhere)

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def default_pcie_share(device_type: str) -> float | str:
    """The warm tier's share when none is given: PCIE_SHARE_CUDA on a CUDA device, else 0 (no
    GPU reads host memory)."""
    return PCIE_SHARE_CUDA if device_type == "cuda" else 0.0


def check_pcie_share(share: float | str) -> float | str:
    """The warm tier's share, validated: "auto" (balanced per FFN, see COLD_CPU_GBS) or a number
    in 0..1 (the same share of every FFN's non-hot activity)."""
    if isinstance(share, str) and share.strip().lower() == "auto":
        return "auto"
    try:
        share = float(share)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 <= share <= 1.0:    # also rejects NaN
        raise HybridInferError(f"pcie share {share} is outside 0..1: give auto or the share of each FFN's "
                               "non-hot activity the GPU reads over PCIe (0 = none)")
    return share


def pcie_share_arg(text: str) -> float | str:
    """argparse type of --pcie-share (cli, bench decode): auto or a number in 0..1."""
    import argparse
    try:
        return check_pcie_share(text)
    except HybridInferError as e:          # argparse prints it as a usage error
        raise argparse.ArgumentTypeError(str(e)) from None


def balanced_share(nbytes: float) -> float:
    """The "auto" warm share of an FFN with non-hot rows that read nbytes per call (expected; see
    COLD_CPU_GBS): the balanced split, or 1 (every non-hot row warm) where that is faster than
    the split with the CPU half's fixed cost (always for small nbytes, also 0)."""
    b = max(nbytes, 0.0)
    t_cpu, t_pcie = b / COLD_CPU_GBS, b / ZERO_COPY_GBS
    s = 0.0 if t_cpu <= PCIE_LATENCY_S else min(1.0, (t_cpu - PCIE_LATENCY_S) / (t_cpu + t_pcie))
    split = max((1 - s) * t_cpu + COLD_CPU_FIXED_S, PCIE_LATENCY_S + s * t_pcie if s > 0 else 0.0)
    return 1.0 if PCIE_LATENCY_S + t_pcie < split else s


def parse_budget(text: str, free_vram: int | None = None, total_vram: int | None = None) -> int:
    """A VRAM budget in bytes from "16GiB", "16000MB", "300KiB", "123456" (bytes), "0" (nothing),
    "0.8" (share of free VRAM; a bare number <= 1 is a share) or "auto" (free VRAM minus a margin)."""
    s = str(text).strip().lower().replace(" ", "").replace("_", "")
    if s == "auto":
        if free_vram is None:
            raise HybridInferError("--vram-budget auto needs a visible GPU; give a size such as 8GiB")
        return max(0, free_vram - max(AUTO_MARGIN[0], int(free_vram * AUTO_MARGIN[1])))
    m = re.fullmatch(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)([a-z]*)", s)
    if not m or (m.group(3) and m.group(3) not in _UNITS):
        raise HybridInferError(f"bad VRAM budget {text!r}: use a size (16GiB, 16000MB, 300KiB), "
                               "0, a share of free VRAM (0.8) or auto")
    if m.group(1) == "-" and float(m.group(2)) != 0:
        raise HybridInferError(f"VRAM budget {text!r} is negative")
    value, unit = float(m.group(2)), m.group(3)
    if unit:
        n = int(value * _UNITS[unit])
    elif value <= 1.0 and value != 0:
        if free_vram is None:
            raise HybridInferError(f"VRAM budget {text!r} is a share of free VRAM, but no GPU is visible; give a size")
        n = int(value * free_vram)
    elif value == int(value):
        n = int(value)
    else:
        raise HybridInferError(f"bad VRAM budget {text!r}: a number above 1 needs a unit (B, MB, GiB, ...)")
    if total_vram is not None and n > total_vram:
        raise HybridInferError(f"VRAM budget {n:,} B is larger than the GPU ({total_vram:,} B)")
    return n
