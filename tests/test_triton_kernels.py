"""The Triton hot-half kernels, run by Triton's interpreter on the CPU (the same kernels run
compiled on CUDA; tests/gpu/ checks them there). A subprocess, so TRITON_INTERPRET=1 is set
before triton is imported."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hybridinfer import quant
from hybridinfer.footprint import ffn_rows_bytes
from hybridinfer.kernels.gpu import HotFFN, q4_rows_from_gpu, q4_rows_to_gpu

SCRIPT = textwrap.dedent("""
    import os, torch
    dev = torch.device(os.environ.get("HI_TEST_DEVICE", "cpu"))
    from hybridinfer import quant
    from hybridinfer.ffn import activate
    from hybridinfer.kernels.gpu import HotFFN, _triton, hot_ffn, q4_rows_to_gpu
    tk = _triton()
    assert tk is not None and tk.supported("q4_0")          # the Triton path, not torch
    g = torch.Generator().manual_seed(7)
    worst = {}

    def xq8(x):
        # x as the Q8X row dots see it (q4_0 rows of whole words: triton_q8x's quantisation,
        # emulated in float32 as the kernel computes it), in float64
        xb = x.float().reshape(-1, 32)
        amax = xb.abs().amax(1)
        inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
        q = torch.floor(xb * inv[:, None] + 0.5)
        return (q.double() * (amax / 127.0).double()[:, None]).reshape(-1)

    def ref_ffn(h, x, act, mask):
        W1, W3, W2T = (t.double().cpu() for t in h._weights(torch.float32))
        xd = x.double()
        a = activate(W1 @ xd, W3 @ xd, act, 0.05)
        return (a if mask is None else a * mask) @ W2T

    def note(key, y, ref):
        y = y.double().cpu()
        assert torch.isfinite(y).all(), key
        err = float((y - ref).abs().max()) / max(float(ref.abs().max()), 1e-3)
        worst[key] = max(worst.get(key, 0.0), err)

    def note_q8x(key, y, W, x):
        # the integer-dot GEMV (triton_q8x: x quantised to q8): |y - W x| within half a quantum
        # of x per element, sum_j |W[r,j]| * max|x_b(j)| / 254 (+ float rounding); records the
        # excess over that bound (0 when within)
        y, x = y.double().cpu(), x.double().cpu()
        ref = W @ x
        half = (x.reshape(-1, 32).abs().amax(1) / 254).repeat_interleave(32)
        excess = (y - ref).abs() - W.abs() @ half - 1e-6 * max(float(ref.abs().max()), 1e-3)
        assert torch.isfinite(y).all(), key
        worst[key] = max(worst.get(key, 0.0), float(excess.max().clamp_min(0)))

    for fmt in ["f32", "f16", "bf16", "q4_0"]:
        # odd row counts, one block, odd block counts (2-byte aligned q4_0 rows), 16-byte rows
        for n, d in [(1, 32), (37, 64), (300, 96), (70, 256)]:
            w1, w3 = torch.randn(n, d, generator=g) * 0.2, torch.randn(n, d, generator=g) * 0.2
            w2 = torch.randn(d, n, generator=g) * 0.2
            h = HotFFN.build(w1, w3, w2, torch.arange(n), fmt, dev)
            x = torch.randn(d, generator=g)
            for act in ["drelu", "relu", "fatrelu", "silu"]:
                for mask in [None, torch.rand(n, generator=g) < 0.4, torch.zeros(n, dtype=torch.bool)]:
                    md = None if mask is None else mask.to(dev)
                    y = hot_ffn(h, x[None].to(dev), act, 0.05, md, use_triton=True)[0]
                    q8 = fmt == "q4_0" and d % 64 == 0              # gate_up's integer dots
                    note(fmt + ("-q8" if q8 else ""), y, ref_ffn(h, xq8(x) if q8 else x, act, mask))

    # several K tiles per row (NK > 1) and several column tiles in down: tiny tiles forced;
    # q4_0 rows read as int32 words and as int16 halfwords (WORDS)
    for fmt, bk, words in [("q4_0", 2, True), ("q4_0", 2, False), ("f16", 32, True)]:
        n, d = 45, 192
        w1, w3 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        w2 = torch.randn(d, n, generator=g)
        h = HotFFN.build(w1, w3, w2, torch.arange(n), fmt, dev)
        x = torch.randn(d, generator=g)
        mask = torch.rand(n, generator=g) < 0.7
        for act in ["drelu", "silu"]:
            a = tk.gate_up(fmt, d, h.gate, h.up, x.to(dev), act, 0.05, mask.to(dev),
                           cfg=dict(CHUNK=16, R=4, BK=bk, num_warps=4, WORDS=words))
            a[5] = 0.0                                      # a zero activation is skipped
            y = tk.down(fmt, d, h.down_t, a,
                        cfg=dict(CHUNK=8, R=2, BK=bk, num_warps=4, WORDS=words))
            W1, W3, W2T = (t.double().cpu() for t in h._weights(torch.float32))
            q8 = fmt == "q4_0" and words
            xh = xq8(x) if q8 else x.double()
            ra = activate(W1 @ xh, W3 @ xh, act, 0.05) * mask
            note(fmt + "-tiles-a" + ("-q8" if q8 else ""), a, ra.masked_fill(torch.arange(n) == 5, 0.0))
            note(fmt + "-tiles-y", y, a.double().cpu() @ W2T)

    # the dense GEMV (DeviceLinear: attention, lm_head): every row, odd row counts, NK > 1,
    # halfword and word reads; then through linear()'s dispatch (the custom op on CUDA)
    for n, d, cfg in [(1, 32, None), (37, 64, None), (300, 256, None), (1030, 4096, None),
                      (45, 192, dict(CHUNK=16, R=4, BK=2, num_warps=4, WORDS=False))]:
        w = torch.randn(n, d, generator=g) * 0.2
        rows = q4_rows_to_gpu(quant.pack(w, "q4_0")).to(dev)
        x = torch.randn(d, generator=g)
        W = quant.unpack(quant.pack(w, "q4_0"), "q4_0", d).double()
        tk.LAST.pop("matvec_q8x", None)
        y = tk.matvec("q4_0", d, rows, x.to(dev), cfg=cfg)
        if d % 64 == 0 and cfg is None:                     # whole words: the integer dots
            assert "matvec_q8x" in tk.LAST
            note_q8x("matvec-q8x", y, W, x)
        else:
            note("matvec", y, W @ x.double())
    from hybridinfer.kernels.gpu import DeviceLinear
    from hybridinfer.linear import linear
    w = torch.randn(70, 128, generator=g) * 0.2
    m = DeviceLinear.from_weight(w.to(dev), "q4_0", dev)
    W = quant.unpack(quant.pack(w, "q4_0"), "q4_0", 128).double()
    x = torch.randn(1, 128, generator=g)                    # the GEMV (integer dots)
    note_q8x("linear-1", linear(x.to(dev), m)[0], W, x[0])
    x = torch.randn(5, 128, generator=g)                    # the dequantised matmul
    note("linear-5", linear(x.to(dev), m), x.double() @ W.T)
    x = torch.randn(128, generator=g)                       # the custom op itself, any device
    note_q8x("op", torch.ops.hybridinfer.matvec_q4(m.weight, x.to(dev), 128), W, x)

    # device-selected experts (slots): expert sel[s]'s rows through address tables; experts of
    # different row counts, one with none (never chosen), the chosen order not sorted
    n_ff, d = 200, 128
    hots = []
    for n in (150, 0, 37, 200):
        ids = torch.randperm(n_ff, generator=g)[:n].sort().values
        w1, w3, w2 = (torch.randn(n_ff, d, generator=g) * 0.2, torch.randn(n_ff, d, generator=g) * 0.2,
                      torch.randn(d, n_ff, generator=g) * 0.2)
        hots.append(HotFFN.build(w1, w3, w2, ids, "q4_0", dev) if n else None)
    rows = lambda name: [None if h is None else getattr(h, name) for h in hots]
    tabs = [tk.RowTable.build("q4_0", d, rows(nm), dev) for nm in ("gate", "up", "down_t")]
    it = tk.RowTable.build(None, d, [None if h is None else h.ids for h in hots], dev)
    sel = torch.tensor([3, 0, 2])
    x = torch.randn(d, generator=g)
    rw = torch.rand(3, generator=g)
    for mask in (torch.rand(3, n_ff, generator=g) < 0.5, None):
        a = torch.zeros(3, 256, device=dev)
        tk.gate_up_slots("q4_0", d, tabs[0], tabs[1], it, x.to(dev), "drelu", 0.05,
                         None if mask is None else mask.to(dev), sel.to(dev), a)
        y = tk.down_slots("q4_0", d, tabs[2], a, 256, torch.zeros(d, device=dev), 0, sel.to(dev),
                          rw.to(dev))
        ref = torch.zeros(d, dtype=torch.float64)
        for s, e in enumerate(sel.tolist()):
            h = hots[e]
            m = None if mask is None else mask[s][h.ids.long().cpu()]
            W1, W3, W2T = (t.double().cpu() for t in h._weights(torch.float32))
            ra = activate(W1 @ xq8(x), W3 @ xq8(x), "drelu", 0.05)
            ra = ra if m is None else ra * m
            note("slots-a-q8", a[s, :h.n_hot], ra)
            ref += float(rw[s]) * (ra @ W2T)
        note("slots-y-q8", y, ref)
    # matvec / axpy slots with one x for all (xs = 0) and per-slot x, per-slot y (the predictors)
    fc = [torch.randn(n, d, generator=g) * 0.2 for n in (40, 40, 40)]
    for fmt in ("q4_0", "bf16"):
        pk = [q4_rows_to_gpu(quant.pack(w, "q4_0")) if fmt == "q4_0" else w.to(torch.bfloat16) for w in fc]
        wt = tk.RowTable.build(fmt, d, [t.to(dev) for t in pk], dev)
        W = [quant.unpack(quant.pack(w, "q4_0"), "q4_0", d).double() if fmt == "q4_0"
             else w.to(torch.bfloat16).double() for w in fc]
        sel2 = torch.tensor([2, 0])
        xs = torch.randn(2, d, generator=g)
        y = tk.matvec_slots(fmt, d, wt, xs.to(dev), d, torch.zeros(2, 64, device=dev), sel2.to(dev))
        check = (lambda k, y, W, x: note_q8x(k, y, W, x)) if fmt == "q4_0" else \
            (lambda k, y, W, x: note(k, y, W @ x.double()))
        for s, e in enumerate(sel2.tolist()):
            check("matvec-slots-" + fmt, y[s, :40], W[e], xs[s])
        y = tk.matvec_slots(fmt, d, wt, xs[0].to(dev), 0, torch.zeros(2, 40, device=dev), sel2.to(dev))
        for s, e in enumerate(sel2.tolist()):
            check("matvec-slots-x0-" + fmt, y[s], W[e], xs[0])
        if fmt == "q4_0":          # the transposed use: rows of W^T, coefficients shared
            at = torch.randn(40, generator=g)
            y = tk.down_slots(fmt, d, wt, at.to(dev), 0, torch.zeros(2, d, device=dev), d, sel2.to(dev))
            for s, e in enumerate(sel2.tolist()):
                note("down-slots-shared-a", y[s], at.double() @ W[e])
            y = tk.down_slots(fmt, d, wt, at.to(dev), 0, torch.zeros(2, d, device=dev), d,
                              sel2.to(dev), relu_a=True)                 # a predictor's relu
            for s, e in enumerate(sel2.tolist()):
                note("down-slots-relu-a", y[s], at.double().clamp_min(0) @ W[e])
    # q4_0 rows in GGUF's own layout (the CPU's cold rows, read in place: the warm tier), from
    # page-locked host memory on CUDA (UVA): one row tile and forced small tiles, odd block
    # counts; then device-selected through address tables of host rows, one expert without rows
    def host_rows(t):
        return t.pin_memory() if dev.type == "cuda" else t
    for n, d, cfg_gu, cfg_dn in [(37, 96, None, None), (300, 256, None, None),
                                 (45, 192, dict(CHUNK=16, R=4, BK=2, num_warps=4),
                                  dict(CHUNK=8, R=2, BK=2, num_warps=4))]:
        w1, w3 = torch.randn(n, d, generator=g) * 0.2, torch.randn(n, d, generator=g) * 0.2
        w2t = torch.randn(n, d, generator=g) * 0.2
        P1, P3, P2 = (quant.pack(w, "q4_0") for w in (w1, w3, w2t))
        W1, W3, W2T = (quant.unpack(p, "q4_0", d).double() for p in (P1, P3, P2))
        x = torch.randn(d, generator=g)
        mask = torch.rand(n, generator=g) < 0.6
        for act in ["drelu", "silu"]:
            a = tk.gate_up("q4_0", d, P1.to(dev), P3.to(dev), x.to(dev), act, 0.05, mask.to(dev),
                           cfg=cfg_gu, gguf=True)
            ra = activate(W1 @ x.double(), W3 @ x.double(), act, 0.05) * mask
            note("gguf-a", a, ra)
            note("gguf-y", tk.down("q4_0", d, P2.to(dev), a, cfg=cfg_dn, gguf=True), a.double().cpu() @ W2T)
    warm, packs = [], []
    for n in (90, 0, 33):
        ids = torch.randperm(n_ff, generator=g)[:n].sort().values.to(torch.int32)
        ws = [torch.randn(n, d, generator=g) * 0.2 for _ in range(3)]
        packs.append([quant.unpack(quant.pack(w, "q4_0"), "q4_0", d).double() for w in ws] + [ids])
        warm.append([host_rows(quant.pack(w, "q4_0")) for w in ws] + [ids.to(dev)] if n else None)
    col = lambda i: [None if w is None else w[i] for w in warm]
    wtabs = [tk.RowTable.build("q4_0", d, col(i), dev, gguf=True) for i in range(3)]
    wit = tk.RowTable.build(None, d, col(3), dev)
    sel = torch.tensor([2, 0])
    x = torch.randn(d, generator=g)
    rw = torch.rand(2, generator=g)
    mask = torch.rand(2, n_ff, generator=g) < 0.5
    a = torch.zeros(2, 128, device=dev)
    tk.gate_up_slots("q4_0", d, wtabs[0], wtabs[1], wit, x.to(dev), "drelu", 0.05, mask.to(dev),
                     sel.to(dev), a)
    y = tk.down_slots("q4_0", d, wtabs[2], a, 128, torch.zeros(d, device=dev), 0, sel.to(dev), rw.to(dev))
    ref = torch.zeros(d, dtype=torch.float64)
    for s, e in enumerate(sel.tolist()):
        W1, W3, W2T, ids = packs[e]
        ra = activate(W1 @ x.double(), W3 @ x.double(), "drelu", 0.05) * mask[s][ids.long()]
        note("gguf-slots-a", a[s, :ids.numel()], ra)
        ref += float(rw[s]) * (ra @ W2T)
    note("gguf-slots-y", y, ref)
    # a large expert's hot half (n >= 8192 rows, a sparse mask) through address tables
    n_big, d = 8200, 64
    big = [HotFFN.build(*(torch.randn(n_big, d, generator=g) * 0.2 for _ in range(2)),
                        torch.randn(d, n_big, generator=g) * 0.2, torch.arange(n_big), "q4_0", dev)
           for _ in range(2)]
    rows = lambda name: [getattr(h, name) for h in big]
    tabs = [tk.RowTable.build("q4_0", d, rows(nm), dev) for nm in ("gate", "up", "down_t")]
    it = tk.RowTable.build(None, d, rows("ids"), dev)
    sel, x, rw = torch.tensor([1, 0]), torch.randn(d, generator=g), torch.rand(2, generator=g)
    mask = torch.rand(2, n_big, generator=g) < 0.15
    a = torch.zeros(2, n_big, device=dev)
    tk.gate_up_slots("q4_0", d, tabs[0], tabs[1], it, x.to(dev), "drelu", 0.05, mask.to(dev),
                     sel.to(dev), a)
    y = tk.down_slots("q4_0", d, tabs[2], a, n_big, torch.zeros(d, device=dev), 0, sel.to(dev),
                      rw.to(dev))
    ref = torch.zeros(d, dtype=torch.float64)
    for s, e in enumerate(sel.tolist()):
        W1, W3, W2T = (t.double().cpu() for t in big[e]._weights(torch.float32))
        ra = activate(W1 @ xq8(x), W3 @ xq8(x), "drelu", 0.05) * mask[s]
        note("big-slots-a-q8", a[s], ra)
        ref += float(rw[s]) * (ra @ W2T)
    note("big-slots-y-q8", y, ref)
    print(worst)
    # "-q8": against x as quantised; exact on the CPU (the interpreter divides as float32 does),
    # on CUDA the kernel's division may round a block's 127 / max|x| differently, moving one
    # element of x by a quantum (~1e-3 here) once in a while
    q8tol = 1e-5 if dev.type == "cpu" else 1e-2
    assert all(v < (q8tol if k.endswith("-q8") else 1e-5) for k, v in worst.items()), worst
""")


def run_kernel_script(script: str, device: str, timeout: int) -> str:
    """Run a test script in a fresh interpreter on `device` (cpu: Triton's interpreter runs the
    kernels on CPU tensors; TRITON_INTERPRET must be set before triton is imported); assert it
    exited cleanly and return its stdout."""
    pytest.importorskip("triton")
    env = {**os.environ, "HI_TEST_DEVICE": device}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_hot_ffn_matches_float64_reference(device):
    run_kernel_script(SCRIPT, device, 900)


def test_q4_gpu_row_layout_is_a_permutation_of_the_gguf_bytes():
    g = torch.Generator().manual_seed(3)
    n, d = 5, 96
    w = torch.randn(n, d, generator=g)
    p = quant.pack(w, "q4_0")                                   # GGUF rows [n, 3*18]
    r = q4_rows_to_gpu(p)
    assert r.shape == p.shape and r.dtype == torch.uint8
    assert torch.equal(q4_rows_from_gpu(r), p)
    assert torch.equal(r.sort(dim=1).values, p.sort(dim=1).values)
    nb = d // 32
    assert torch.equal(r[:, :16], p[:, 2:18]) and torch.equal(r[:, nb * 16:nb * 16 + 2], p[:, :2])
    h = HotFFN.build(w, w, w.t().contiguous(), torch.arange(n), "q4_0", torch.device("cpu"))
    assert h.nbytes == ffn_rows_bytes(n, d, "q4_0")
    assert torch.equal(h.gate, r)                              # held in the GPU row layout
    torch.testing.assert_close(h._weights(torch.float32)[0], quant.unpack(p, "q4_0", d))


def test_fused_qkv_rows_are_views_and_compute_the_same():
    """kernels.gpu.stacked_linears: q, k, v packed as views of one matrix; the fused projection
    equals the three separate ones (the dequantised path here; the GEMV on cuda in SCRIPT)."""
    from hybridinfer.kernels.gpu import DeviceLinear, stacked_linears
    from hybridinfer.model import qkv_projections
    g = torch.Generator().manual_seed(11)
    ws = [torch.randn(n, 64, generator=g) for n in (64, 32, 32)]
    parts = [DeviceLinear.from_weight(w, "q4_0", "cpu") for w in ws]
    whole, views = stacked_linears([(lambda w=w: w, w.shape[0]) for w in ws], 64, "q4_0", "cpu")
    assert whole.out_features == 128 and whole.nbytes == sum(p.nbytes for p in parts)
    for p, v in zip(parts, views):
        assert torch.equal(p.weight, v.weight) and v.weight.data_ptr() >= whole.weight.data_ptr()
    x = torch.randn(3, 64, generator=g)
    bias = [torch.randn(n, generator=g) for n in (64, 32, 32)]
    sep = qkv_projections(x, *parts, *bias)
    fused = qkv_projections(x, *views, *bias, qkv=whole)
    for a, b in zip(sep, fused):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="expected"):
        stacked_linears([(lambda: ws[0], 64), (lambda: torch.randn(8, 96), 8)], 64, "q4_0", "cpu")


FLAGS_SCRIPT = textwrap.dedent("""
    import os, threading, time, torch
    from hybridinfer.kernels import cpu_step, triton_flags
    cuda = os.environ.get("HI_TEST_DEVICE", "cpu") == "cuda"
    f = torch.zeros(2, dtype=torch.int32, pin_memory=cuda)
    ready, done = f[0], f[1]
    triton_flags.signal(ready.data_ptr())                    # the device: inputs are ready
    assert cpu_step.wait_flag(ready, timeout=10.0)                 # the host sees it, resets it
    assert int(ready) == 0
    def host():                                               # the host's answer, 50 ms later
        time.sleep(0.05)
        done.fill_(1)
    th = threading.Thread(target=host)
    t = time.perf_counter()
    th.start()
    triton_flags.await_(done.data_ptr())                      # the device waits for it
    if cuda:
        torch.cuda.synchronize()
    th.join()
    assert time.perf_counter() - t >= 0.05                    # it did wait
    assert int(done) == 0                                     # and reset the flag
    t = time.perf_counter()
    triton_flags.await_(done.data_ptr(), 1000)                # never set: gives up
    if cuda:
        torch.cuda.synchronize()
    assert time.perf_counter() - t < 5.0
    print("ok")
""")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_device_flags_signal_and_await(device):
    """kernels/triton_flags.py: the device sets a host flag, and waits for the host's (then
    resets it), the protocol of the chained decode step; a wait gives up after its limit."""
    assert "ok" in run_kernel_script(FLAGS_SCRIPT, device, 300)


ATTN_SCRIPT = textwrap.dedent("""
    import os, torch
    from hybridinfer.kernels.triton_attention import decode_attention
    dev = torch.device(os.environ.get("HI_TEST_DEVICE", "cpu"))
    g = torch.Generator().manual_seed(5)
    cases = [(8, 2, 32, 100, 0, 0), (8, 2, 32, 100, 57, 0), (32, 8, 128, 512, 300, 0),
             (4, 4, 16, 40, 39, 5), (8, 2, 32, 1000, 999, 0), (8, 2, 32, 1000, 640, 100)]
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for H, KV, hd, C, pos, win in cases:
            q = torch.randn(H, hd, generator=g).to(dt)
            k = torch.randn(KV, C, hd, generator=g).to(dt)
            v = torch.randn(KV, C, hd, generator=g).to(dt)
            y = decode_attention(q.to(dev), k.to(dev), v.to(dev), torch.tensor([pos], device=dev),
                                 win, hd ** -0.5)
            lo = max(0, pos - win + 1) if win else 0
            qd, kd, vd = q.double().view(KV, H // KV, hd), k.double(), v.double()
            sc = qd @ kd.transpose(1, 2) * hd ** -0.5
            ok = torch.zeros(C, dtype=torch.bool)
            ok[lo:pos + 1] = True
            ref = (torch.softmax(sc.masked_fill(~ok, float("-inf")), -1) @ vd).reshape(H, hd)
            err = float((y.double().cpu() - ref).abs().max() / ref.abs().max())
            assert y.dtype == dt and err < tol, (dt, H, KV, hd, C, pos, win, err)
    print("ok")
""")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_attention_matches_float64_reference(device):
    """kernels/triton_attention.py: one token's GQA attention split over the live positions
    (window or not, one slice or many, f32 and bf16 caches) against float64 softmax attention."""
    assert "ok" in run_kernel_script(ATTN_SCRIPT, device, 600)
