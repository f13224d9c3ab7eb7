"""Device <-> host flags for the chained decode step (graphs.py, kernels.cpu_step.ColdChain).

A flag is one int32 in page-locked host memory, passed by address. On the device:
  signal(addr):   *addr = 1              (after the copies the host will read, in stream order)
  await_(addr):   spin until *addr == 1, then *addr = 0; a one-warp kernel whose volatile
                  loads (ld.volatile = relaxed, system scope) see the host's store over PCIe.
                  After `limit` polls it gives up (the host side reports the error; the device
                  must not hang a process forever).
Both are plain kernels, so CUDA graphs capture them like any other node. With
TRITON_INTERPRET=1 they run on CPU memory (how CI tests them).
"""
from __future__ import annotations

import triton
import triton.language as tl

LIMIT = 1 << 26           # polls before an await gives up (each ~1 us over PCIe: about a minute)


@triton.jit(do_not_specialize=["addr"])
def _signal_kernel(addr):
    p = addr.to(tl.pointer_type(tl.int32))
    tl.store(p, 1)


@triton.jit(do_not_specialize=["addr", "limit"])
def _await_kernel(addr, limit):
    p = addr.to(tl.pointer_type(tl.int32))
    v = tl.load(p, volatile=True)
    n = 0
    while (v != 1) & (n < limit):
        v = tl.load(p, volatile=True)
        n += 1
    tl.store(p, 0)


def signal(addr: int) -> None:
    """Enqueue *addr = 1 on the current stream."""
    _signal_kernel[(1,)](addr, num_warps=1)


def await_(addr: int, limit: int = LIMIT) -> None:
    """Enqueue a wait for *addr == 1 (then *addr = 0) on the current stream."""
    _await_kernel[(1,)](addr, limit, num_warps=1)
