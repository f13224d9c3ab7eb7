"""The prefill dequant's launch tile on the GPU (kernels/triton_dequant.py): one M47 expert's gate,
up and down_t, 11,000 hot rows (GPU layout) + 3,336 streamed cold rows (GGUF layout) -> bf16
[3, 14336, 4096], as HybridFFN.device_batch makes them. CUDA events, median of --reps launches.

    python3 benchmarks/dequant_sweep.py [--reps 20]
"""
import argparse
import statistics

import torch

from hybridinfer.kernels.triton_dequant import dequant_q4_0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="timed launches per configuration")
    a = ap.parse_args()
    dev, d, na, nb_ = torch.device("cuda"), 4096, 11000, 3336
    g = torch.Generator(device=dev).manual_seed(0)
    rb = d // 32 * 18
    rows_a = torch.randint(0, 256, (3, na, rb), dtype=torch.uint8, device=dev, generator=g)
    rows_b = torch.randint(0, 256, (3, nb_, rb), dtype=torch.uint8, device=dev, generator=g)
    for r in (rows_a,):                     # GPU layout: scales after the nibbles; keep them finite
        r[..., d // 32 * 16:].view(torch.int16)[:] = 0x1400
    rows_b.view(3, nb_, d // 32, 18)[..., :2] = torch.tensor([0, 0x14], dtype=torch.uint8, device=dev)
    out = torch.empty(3, na + nb_, d, dtype=torch.bfloat16, device=dev)
    moved = out.numel() * 2 + (rows_a.numel() + rows_b.numel())     # bytes written + read
    ref = dequant_q4_0(rows_a, d, "gpu", torch.bfloat16, rows_b=rows_b).clone()
    print(f"{'bb':>4} {'warps':>5} {'ms':>8} {'GB/s':>7}  (one expert: {moved / 1e6:.0f} MB moved)")
    configs = [(None, None)] + [(bb, w) for bb in (16, 32, 64, 128) for w in (2, 4, 8)]
    for bb, w in configs:
        kw = {} if bb is None else {"bb": bb, "num_warps": w}
        try:
            dequant_q4_0(rows_a, d, "gpu", torch.bfloat16, out=out, rows_b=rows_b, **kw)
        except TypeError:                   # an older kernel without the tile arguments
            continue
        torch.cuda.synchronize()
        assert torch.equal(out, ref), (bb, w)
        ts = []
        for _ in range(a.reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dequant_q4_0(rows_a, d, "gpu", torch.bfloat16, out=out, rows_b=rows_b, **kw)
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e))
        ms = statistics.median(ts)
        print(f"{'dflt' if bb is None else bb:>4} {'' if w is None else w:>5} {ms:8.3f} {moved / ms / 1e6:7.0f}",
              flush=True)


if __name__ == "__main__":
    main()
