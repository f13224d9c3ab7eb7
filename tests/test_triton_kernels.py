"""The Triton hot-half kernels, run by Triton's interpreter on the CPU (the same kernels run
compiled on CUDA; tests/gpu/ checks them there). A subprocess, so TRITON_INTERPRET=1 is set
before triton is imported."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import os, torch
    dev = torch.device(os.environ.get("HI_TEST_DEVICE", "cpu"))
    from hybridinfer import quant
    from hybridinfer.ffn import activate
    from hybridinfer.kernels.gpu import HotFFN, _triton, hot_ffn
    assert _triton() is not None and _triton().supported("q4_0")   # the Triton path, not torch
    g = torch.Generator().manual_seed(7)
    worst = {}
    for fmt in ["f32", "f16", "bf16", "q4_0"]:
        for n, d in [(1, 32), (37, 64), (300, 96)]:           # odd row counts, several blocks
            w1, w3 = torch.randn(n, d, generator=g) * 0.2, torch.randn(n, d, generator=g) * 0.2
            w2 = torch.randn(d, n, generator=g) * 0.2
            ids = torch.arange(n)
            h = HotFFN.build(w1, w3, w2, ids, fmt, dev)
            W1, W3, W2T = (quant.unpack(t, fmt, d).cpu() if fmt == "q4_0" else t.float().cpu()
                           for t in (h.gate, h.up, h.down_t))
            x = torch.randn(1, d, generator=g)
            for act in ["drelu", "relu", "fatrelu", "silu"]:
                for mask in [None, torch.rand(n, generator=g) < 0.4, torch.zeros(n, dtype=torch.bool)]:
                    md = None if mask is None else mask.to(dev)
                    xd = x[0].double()
                    a = activate(W1.double() @ xd, W3.double() @ xd, act, 0.05)
                    if mask is not None:
                        a = a * mask
                    ref = a @ W2T.double()
                    y = hot_ffn(h, x.to(dev), act, 0.05, md, use_triton=True)[0].double().cpu()
                    scale = max(float(ref.abs().max()), 1e-3)
                    err = float((y - ref).abs().max()) / scale
                    worst[fmt] = max(worst.get(fmt, 0.0), err)
    print(worst)
    assert all(v < 1e-5 for v in worst.values()), worst
""")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_hot_ffn_matches_float64_reference(device):
    env = {**os.environ, "HI_TEST_DEVICE": device}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"      # the interpreter runs the kernels on CPU tensors
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
