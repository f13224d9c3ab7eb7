"""kernels.triton_dequant: q4_0 rows (GGUF and GPU layouts) -> float, by Triton's interpreter on the
CPU (a subprocess: TRITON_INTERPRET=1 before triton is imported) and compiled on cuda, against
quant.unpack."""
from __future__ import annotations

import textwrap

import pytest
from test_triton_kernels import run_kernel_script

SCRIPT = textwrap.dedent("""
    import os, torch
    dev = torch.device(os.environ.get("HI_TEST_DEVICE", "cpu"))
    from hybridinfer import quant
    from hybridinfer.kernels.gpu import q4_rows_to_gpu
    from hybridinfer.kernels.triton_dequant import dequant_q4_0
    g = torch.Generator().manual_seed(3)
    for n, d in [(5, 64), (3, 32 * 37), (1, 4096), (0, 64)]:
        w = torch.randn(n, d, generator=g) * 3
        p = quant.pack(w, "q4_0")
        ref = quant.unpack(p, "q4_0", d)                      # float32, exact values
        for layout, rows in (("gguf", p), ("gpu", q4_rows_to_gpu(p))):
            y = dequant_q4_0(rows.to(dev), d, layout, torch.float32).cpu()
            assert y.shape == (n, d) and torch.equal(y, ref), (n, d, layout)
            yb = dequant_q4_0(rows.to(dev), d, layout, torch.bfloat16).float().cpu()
            # one bf16 rounding of the exact value (the interpreter truncates, CUDA rounds to even)
            assert torch.all((yb - ref).abs() <= ref.abs() * 2.0 ** -7), (n, d, layout)
            # into a slice of a larger matrix (prefill assembles hot + cold rows): only the slice
            big = torch.full((n + 3, d), 7.0, device=dev)
            dequant_q4_0(rows.to(dev), d, layout, torch.float32, out=big[2:2 + n])
            big = big.cpu()
            assert torch.equal(big[2:2 + n], ref) and bool((big[:2] == 7).all() and (big[2 + n:] == 7).all())
    try:
        dequant_q4_0(torch.zeros(2, 17, dtype=torch.uint8), 64, "gguf", torch.float32)
    except ValueError as e:
        assert "expected uint8 [n, 36]" in str(e)
    else:
        raise AssertionError("bad shape accepted")
    # [m, n, row] matrices, and two row sets in their own layouts: one matrix set, a's rows first
    d3 = 96
    wa, wb = torch.randn(3, 5, d3, generator=g), torch.randn(3, 4, d3, generator=g)
    pa = torch.stack([q4_rows_to_gpu(quant.pack(w, "q4_0")) for w in wa])
    pb = torch.stack([quant.pack(w, "q4_0") for w in wb])
    ref = torch.stack([torch.cat([quant.unpack(quant.pack(wa[k], "q4_0"), "q4_0", d3),
                                  quant.unpack(pb[k], "q4_0", d3)]) for k in range(3)])
    y = dequant_q4_0(pa.to(dev), d3, "gpu", torch.float32, rows_b=pb.to(dev), layout_b="gguf").cpu()
    assert y.shape == (3, 9, d3) and torch.equal(y, ref)
    y = dequant_q4_0(pb.to(dev), d3, "gguf", torch.float32).cpu()
    assert torch.equal(y, ref[:, 5:])
    try:
        dequant_q4_0(p.to(dev), d, "gguf", torch.float32, out=torch.empty(n + 1, d, device=dev))
    except ValueError as e:
        assert "out must be contiguous" in str(e)
    else:
        raise AssertionError("bad out accepted")
    print("OK")
""")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dequant_q4_0_matches_unpack(device):
    assert "OK" in run_kernel_script(SCRIPT, device, 300)
