"""kernels.gpu.pin_host: cold rows page-locked for prefill's async streaming, released with owner."""
from __future__ import annotations

import gc

import pytest
import torch

from hybridinfer.kernels.cpu import alloc_weights
from hybridinfer.kernels.gpu import pin_host


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


@pytest.mark.gpu
def test_pin_host_registers_and_releases():
    t = alloc_weights(1024, 4608)                   # 4.5 MiB, huge-page mmap where allowed
    t.random_(0, 255)
    owner = Owner()
    assert pin_host(owner, t) == t.numel()
    assert t.is_pinned() and t[100:200].is_pinned()
    d = t[100:200].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(d.cpu(), t[100:200])
    del owner
    gc.collect()
    assert not t.is_pinned()
