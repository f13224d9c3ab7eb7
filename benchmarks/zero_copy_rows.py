"""Can the GPU compute cold rows straight from page-locked host memory (zero-copy over PCIe)?
The hot half's device-selected kernels (triton_ffn gate_up_slots + down_slots, 2 slots) over
rows held (a) in device memory, (b) in pinned host memory (the kernels follow host addresses
through UVA), (c) in pinned host memory in GGUF's own layout (the CPU's cold rows read in place:
the warm tier; halfword loads), at a few active fractions of 12000 rows an expert (M47 at 8 GiB has ~12700 cold
rows an expert and ~10 MB of active cold rows a layer). GPU machine:

    python3 benchmarks/zero_copy_rows.py [--json FILE]

Prints microseconds per call (triton_matvec.timed: a CUDA graph of 10 calls, median of
replays) and the GB/s of the active rows' bytes (gate + up + down), next to the CPU cold half's
rate in decode (~21 GB/s at 8 threads, decode_M47_h100_v11: 0.34 GB in 16 ms a token at 8 GiB).
"""
import argparse
import json

import torch

from hybridinfer import quant
from hybridinfer.kernels import triton_ffn as tk
from hybridinfer.kernels.gpu import q4_rows_to_gpu
from triton_matvec import timed

D, K = 4096, 2
N = 12000 if torch.cuda.is_available() else 64




def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # cpu: a smoke run
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    host, gguf = [], []
    for _ in range(3 * K):            # gate, up, down of K experts; random q4_0 rows, f16 scale 0.025
        r = torch.randint(0, 256, (N, D // 32, 18), dtype=torch.uint8, generator=g)
        r[:, :, 0], r[:, :, 1] = 0x66, 0x26
        r = r.reshape(N, -1)
        pin = (lambda t: t.pin_memory()) if cuda else (lambda t: t)
        host.append(pin(q4_rows_to_gpu(r)))
        gguf.append(pin(r))
    # (rows, GGUF layout, launch configs or None: triton_ffn.config's)
    alt = (dict(CHUNK=16, R=4, BK=128, num_warps=4), dict(CHUNK=64, R=16, BK=8, num_warps=4))
    reg = [r.clone() for r in gguf]            # page-locked in place (cudaHostRegister), as the
    if cuda:                                   # runtime pins the CPU's cold rows (kernels.pinned.pin_host)
        from hybridinfer.kernels.pinned import pin_host
        assert pin_host(main, *reg) == sum(r.numel() for r in reg), "cudaHostRegister refused"
    where = {"device": ([h.to(dev) for h in host], False, (None, None)),
             "registered gguf": (reg, True, (None, None)),
             "pinned host": (host, False, (None, None)),
             "pinned gguf": (gguf, True, (None, None)),
             "pinned gguf R4/C64": (gguf, True, alt)}
    arange = torch.arange(N, dtype=torch.int32, device=dev)
    ids = tk.RowTable.build(None, D, [arange] * K, dev)
    x = torch.randn(D, device=dev)
    sel = torch.arange(K, device=dev)
    w = torch.ones(K, device=dev)
    rb = quant.row_bytes(D, "q4_0")
    rows = []
    for frac in (0.05, 0.1, 0.25):
        mask = torch.rand(K, N, generator=g) < frac
        nbytes = int(mask.sum()) * 3 * rb
        mask = mask.to(dev)
        outs = {}
        for name, (mats, layout, (cgu, cdn)) in where.items():
            gt, ut, dt = (tk.RowTable.build("q4_0", D, mats[i::3], dev, gguf=layout) for i in range(3))
            act = torch.zeros(K, N, device=dev)
            y = torch.zeros(D, device=dev)

            def call():
                tk.gate_up_slots("q4_0", D, gt, ut, ids, x, "silu", 0.0, mask, sel, act, cfg=cgu)   # silu: every masked row read in full
                tk.down_slots("q4_0", D, dt, act, N, y, 0, sel, w, cfg=cdn)
            s = timed(call, reps=15, calls=10) if cuda else (call(), 1.0)[1]
            y.zero_()
            call()
            outs[name] = y.clone()
            rows.append(dict(where=name, frac=frac, mbytes=nbytes / 1e6, us=s * 1e6, gbs=nbytes / s / 1e9))
            print(f"{name:18s} active {frac:4.2f}: {nbytes / 1e6:6.1f} MB  {s * 1e6:8.1f} us  {nbytes / s / 1e9:6.1f} GB/s")
        a_, *others = outs.values()
        for name, b_ in zip(list(outs)[1:], others):    # other launch configs sum in another order
            err = float((a_ - b_).abs().max() / a_.abs().max())
            assert err < 1e-5, f"{name} computed a different y (max error {err:.2e} of max |y|)"
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
