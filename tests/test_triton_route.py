"""The one-launch MoE routing kernel (kernels/triton_route.py) against ffn.route's arithmetic in
float64, run by Triton's interpreter on the CPU (a subprocess: TRITON_INTERPRET=1 before triton
is imported) and compiled on cuda."""
from __future__ import annotations

import textwrap

import pytest
from test_triton_kernels import run_kernel_script

SCRIPT = textwrap.dedent("""
    import os, torch
    from hybridinfer.kernels.triton_route import route_one
    dev = torch.device(os.environ.get("HI_TEST_DEVICE", "cpu"))
    g = torch.Generator().manual_seed(11)

    def ref(x, r, k):
        # ffn.route in float64 from the logits rounded to x's dtype (as F.linear returns them)
        lg = (r.double() @ x.double()).to(x.dtype).double()
        p = torch.softmax(lg, 0)
        w, ids = [], []
        for _ in range(k):
            i = int(torch.argmax(p))          # the first maximum: ties to the lower id
            w.append(float(p[i])); ids.append(i); p[i] = -1.0
        s = sum(w)
        return [v / s for v in w], ids, lg

    cases = 0
    for E, k, d, dt in [(8, 2, 4096, torch.bfloat16), (8, 2, 96, torch.float32),
                        (60, 4, 256, torch.float32), (5, 1, 64, torch.float16),
                        (128, 8, 128, torch.bfloat16)]:
        for trial in range(4):
            x = torch.randn(d, generator=g).to(dt)
            r = (torch.randn(E, d, generator=g) * (3.0 / d ** 0.5)).to(dt)
            wr, ir, lg = ref(x, r, k)
            srt = lg.sort(descending=True).values
            if (srt[:k] - srt[1:k + 1]).abs().min() < 1e-6:
                continue                      # a near-tie: either choice is right
            w, ids = route_one(x.to(dev), r.to(dev), k)
            assert w.shape == (1, k) and w.dtype == dt and ids.shape == (1, k) and ids.dtype == torch.int64
            assert ids[0].tolist() == ir, (E, k, d, dt, ids, ir)
            tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dt]
            err = max(abs(float(a) - b) for a, b in zip(w[0].cpu().double(), wr))
            assert err <= tol, (E, k, d, dt, err)
            cases += 1
    assert cases >= 15, cases
    # exact ties: experts 2 and 5 share the largest logit -> ids [2, 5], weights 1/2 each
    x = torch.randn(64, generator=g)
    r = torch.randn(8, 64, generator=g) * 0.01
    r[5] = r[2] = x / x.norm() * 3
    w, ids = route_one(x.to(dev), r.to(dev), 2)
    assert ids[0].tolist() == [2, 5] and torch.allclose(w.cpu(), torch.tensor([[0.5, 0.5]]))
    try:
        route_one(x.to(dev), r.to(dev), 9)
    except ValueError as e:
        assert "1 <= k <= E" in str(e)
    else:
        raise AssertionError("k > E accepted")
    print("OK", cases)
""")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_route_one_matches_route(device):
    assert "OK" in run_kernel_script(SCRIPT, device, 300)
