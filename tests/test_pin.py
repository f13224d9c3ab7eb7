"""kernels.pinned.pin_host: cold rows page-locked for prefill's async streaming and the warm tier's
reads in place, released with owner; page_locked() sees the ranges it registered."""
from __future__ import annotations

import gc

import pytest
import torch

from hybridinfer.kernels.cpu import alloc_weights
from hybridinfer.kernels.pinned import page_locked, pin_host


class Owner:
    pass


def test_pin_host_is_off_without_cuda_or_when_asked(monkeypatch):
    t = alloc_weights(4, 64)
    monkeypatch.setenv("HYBRIDINFER_NO_PIN", "1")
    # even where CUDA is there, the switch wins before any CUDA call (a CPU build would raise)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pin_host(Owner(), t) == 0
    monkeypatch.undo()
    if not torch.cuda.is_available():
        assert pin_host(Owner(), t) == 0


class FakeCudart:
    """cudaHostRegister / cudaHostUnregister that record the ranges (CI has no CUDA)."""

    def __init__(self, refuse=False):
        self.live, self.refuse = {}, refuse

    def cudaHostRegister(self, ptr, n, flags):
        if self.refuse:
            return 2                                     # cudaErrorMemoryAllocation
        self.live[ptr] = n
        return 0

    def cudaHostUnregister(self, ptr):
        del self.live[ptr]
        return 0

    def cudaGetLastError(self):
        return 0


def test_page_locked_knows_what_pin_host_registered(monkeypatch):
    """The registered ranges, not torch's is_pinned() (which does not see cudaHostRegister'ed
    memory its allocator did not make, e.g. alloc_weights' huge-page mmap of 8 MiB and more):
    the tensor and its views are page-locked until the owner goes; other memory is not; a refusal
    leaves nothing registered."""
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    t = alloc_weights(3 * 1200, 2304)                  # 8.3 MB: the mmap path
    stacked = t.view(3, 1200, -1)
    other = alloc_weights(4, 64)
    owner = Owner()
    assert pin_host(owner, stacked) == t.numel() and fake.live == {t.data_ptr(): t.numel()}
    assert page_locked(t) and page_locked(stacked[1]) and page_locked(stacked[2, 5:9])
    assert page_locked(stacked[:, 3:7, :100])           # a strided view inside the range
    assert not page_locked(other) and not page_locked(torch.empty(0))
    assert pin_host(Owner(), stacked[0]) == 0           # already page-locked: not registered twice
    del owner
    gc.collect()
    assert fake.live == {} and not page_locked(stacked[1])
    fake.refuse = True
    assert pin_host(Owner(), t) == 0 and not page_locked(t)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1024, 4096])
def test_pin_host_registers_and_releases(rows):
    """4.5 MiB (torch.empty memory) and 18 MiB (alloc_weights' huge-page mmap: is_pinned() does
    not see its registration, page_locked() does)."""
    t = alloc_weights(rows, 4608)
    t.random_(0, 255)
    owner = Owner()
    assert pin_host(owner, t) == t.numel()
    assert page_locked(t) and page_locked(t[100:200])
    d = t[100:200].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(d.cpu(), t[100:200])
    del owner
    gc.collect()
    assert not page_locked(t)
