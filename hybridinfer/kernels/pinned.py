"""Page-locked host memory for the hybrid split: the CPU's cold rows registered with CUDA
(cudaHostRegister) so that prefill streams them by async DMA and the GPU reads the warm tier in
place, and the record of what was registered (torch's is_pinned() does not see it)."""
from __future__ import annotations

import torch

_LOCKED: dict[int, int] = {}     # start -> end address of each host range pin_host registered


def page_locked(t: torch.Tensor) -> bool:
    """Whether a CPU tensor's bytes are page-locked: pinned by torch's allocator, or inside a
    range pin_host registered. torch's is_pinned() does not see cudaHostRegister'ed memory that
    its allocator did not make: on the H100 (torch 2.11) it said False for the huge-page mmap of
    kernels.cpu.alloc_weights after a successful registration, and for every FFN of 8 MiB or more
    (a real model's: PackedFFN.from_weights allocates there) the warm tier was off."""
    if t.is_pinned():
        return True
    if t.numel() == 0:
        return False
    a = t.data_ptr()
    b = a + t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))
    return any(s <= a and b <= e for s, e in _LOCKED.items())


def pin_host(owner, *ts: torch.Tensor) -> int:
    """Page-lock the memory of CPU tensors `ts` (cudaHostRegister) so that copies of their slices
    to the GPU run asynchronously at full PCIe speed (prefill streams cold rows) and the GPU can
    read them in place (the warm tier); unregistered when `owner` is collected; page_locked()
    knows the ranges. Returns the bytes pinned; stops quietly where CUDA refuses (pinned-memory
    limits: copies then stay pageable). HYBRIDINFER_NO_PIN=1 turns it off."""
    import os
    import weakref
    if os.environ.get("HYBRIDINFER_NO_PIN", "") not in ("", "0") or not torch.cuda.is_available():
        return 0
    cudart = torch.cuda.cudart()
    done = []
    for t in ts:
        n = t.numel() * t.element_size()
        if n == 0 or page_locked(t):
            continue
        if int(cudart.cudaHostRegister(t.data_ptr(), n, 0)) != 0:
            if hasattr(cudart, "cudaGetLastError"):  # not sticky: clear it for later launches' checks
                cudart.cudaGetLastError()
            break
        _LOCKED[t.data_ptr()] = t.data_ptr() + n
        done.append(t)
    if done:
        weakref.finalize(owner, _unpin, done)
    return sum(t.numel() * t.element_size() for t in done)


def _unpin(ts: list[torch.Tensor]) -> None:
    cudart = torch.cuda.cudart()
    for t in ts:
        _LOCKED.pop(t.data_ptr(), None)
        cudart.cudaHostUnregister(t.data_ptr())
