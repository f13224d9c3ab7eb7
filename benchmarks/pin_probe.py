"""Does torch's is_pinned() see a cudaHostRegister of kernels.cpu.alloc_weights memory? (GPU machine)

    python3 benchmarks/pin_probe.py

For three sizes of alloc_weights matrix (below 8 MiB: torch.empty memory; from 8 MiB: the
huge-page mmap) and one torch.empty tensor: the registration's return code, is_pinned() after it,
and pin_host's result. Session 12 on the H100 (torch 2.11, results/pin_probe_h100_s12.txt): rc 0
everywhere, is_pinned() False for the mmap'd matrices, which is why kernels.pinned.page_locked
keeps its own record of what pin_host registered.
"""
import torch

from hybridinfer.kernels.cpu import alloc_weights
from hybridinfer.kernels.pinned import pin_host


class Owner:
    pass


def main():
    cudart = torch.cuda.cudart()
    for rows in (100, 4000, 40000):
        t = alloc_weights(3 * rows, 2304)
        t.fill_(1)
        n = t.numel()
        rc = int(cudart.cudaHostRegister(t.data_ptr(), n, 0))
        print("alloc_weights", rows, "bytes", n, "register rc", rc, "is_pinned", t.is_pinned(),
              "ptr%2MiB", t.data_ptr() % (2 << 20))
        if rc == 0:
            cudart.cudaHostUnregister(t.data_ptr())
        else:
            print("  last error", int(cudart.cudaGetLastError()))
        o = Owner()
        print("  pin_host ->", pin_host(o, t), t.is_pinned())
        v = t.view(3, rows, -1)
        print("  view pinned", v.is_pinned(), v[0].is_pinned())
    e = torch.empty(3 * 4000 * 2304, dtype=torch.uint8)
    e.fill_(1)
    o2 = Owner()
    print("torch.empty pin_host ->", pin_host(o2, e), e.is_pinned())


if __name__ == "__main__":
    main()
