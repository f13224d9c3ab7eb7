"""What machine a benchmark ran on, and how fast it can read memory (the roofline's CPU term).

machine_info() goes into every results JSON. read_bandwidth() is STREAM-like: a parallel
read-only sum over a buffer much larger than the last-level cache, on the kernels' own thread
pool with the same thread count as the kernels it is compared with (falls back to torch.sum
when the native module is missing). flush_caches() reads the same buffer to evict the LLC
between timed calls.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time

import torch

try:
    from hybridinfer.kernels import cpu as _cpu
    _cpu.isa()
except Exception:  # pragma: no cover - no native build
    _cpu = None

_BUF: torch.Tensor | None = None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _llc_bytes() -> int | None:
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = None
    try:
        for idx in sorted(os.listdir(base)):
            with open(f"{base}/{idx}/size") as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            v = int(s.rstrip("KMG")) * mult
            best = v if best is None else max(best, v)
    except (OSError, ValueError):
        pass
    return best


def _git_commit() -> str | None:
    if os.environ.get("HYBRIDINFER_GIT_COMMIT"):  # set where the package runs outside a checkout
        return os.environ["HYBRIDINFER_GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(threads=None) -> dict:
    """CPU model, cores, LLC, threads used, GPU name (if any), torch version, git commit."""
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "llc_bytes": _llc_bytes(),
        "threads": threads,
        "kernel_isa": _cpu.isa() if _cpu else None,
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,  # other load?
    }


def _buffer(nbytes: int) -> torch.Tensor:
    global _BUF
    n = nbytes // 4
    if _BUF is None or _BUF.numel() != n:
        _BUF = None
        _BUF = torch.ones(n, dtype=torch.float32)  # written once: pages are really there
    return _BUF


def default_buffer_bytes() -> int:
    """1 GiB, or 4x the last-level cache when that is larger."""
    return max(1 << 30, 4 * (_llc_bytes() or 0))


def _sum(buf: torch.Tensor) -> float:
    if _cpu is not None:
        return _cpu.read_sum(buf)
    return float(buf.sum())


def read_bandwidth(threads: int, nbytes: int | None = None, repeat: int = 7) -> float:
    """Best read bandwidth (GB/s, 1e9 bytes) of `repeat` parallel sums over `nbytes`."""
    buf = _buffer(nbytes or default_buffer_bytes())
    if _cpu is not None:
        _cpu.set_num_threads(threads)
    torch.set_num_threads(threads)
    _sum(buf)  # warm-up (thread wake-up, TLB)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        _sum(buf)
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def flush_caches(nbytes: int | None = None) -> None:
    """Read a buffer several times the LLC so that the next timed call starts cold."""
    _sum(_buffer(nbytes or default_buffer_bytes()))


def release_buffer() -> None:
    global _BUF
    _BUF = None
