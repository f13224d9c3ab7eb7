"""The decode step's native small ops (kernels.cpu.rms_norm, attend_one: csrc/attention.cpp)
against float64 references on seeded random inputs, on both dispatch paths, serial and on the
pool; and the model's CPU decode (which uses them) against a float64 re-computation."""
import math

import pytest
import torch

from hybridinfer.kernels import cpu

from test_kernels_cpu import PATHS, use_path


@pytest.fixture(autouse=True)
def _restore_dispatch():
    yield
    cpu.force_reference(False)
    cpu.set_num_threads(2)


def rope64(x, cos, sin):
    """x [..., hd] float64, HF's rotate-half."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def attend64(q, k, v, kc, vc, pos, cos, sin, lo):
    """float64 reference: (y [H*hd], k row written, v row written) with the caches' earlier rows."""
    KV, cap, hd = kc.shape
    H = q.numel() // hd
    c, s = cos.double(), sin.double()
    qr = rope64(q.double().view(H, hd), c, s)
    kr = rope64(k.double().view(KV, hd), c, s)
    K = kc.double().clone()
    V = vc.double().clone()
    K[:, pos], V[:, pos] = kr, v.double().view(KV, hd)
    rep = H // KV
    y = torch.empty(H, hd, dtype=torch.float64)
    for h in range(H):
        g = h // rep
        sc = (K[g, lo:pos + 1] @ qr[h]) / math.sqrt(hd)
        y[h] = torch.softmax(sc, -1) @ V[g, lo:pos + 1]
    return y.reshape(-1), kr, V[:, pos]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("H,KV,hd,pos,lo", [(4, 2, 16, 0, 0), (8, 2, 32, 37, 0), (6, 6, 8, 20, 5),
                                            (32, 8, 128, 70, 0), (32, 8, 128, 300, 200)])
@pytest.mark.parametrize("threads", [1, 2])
def test_attend_one_matches_float64(path, H, KV, hd, pos, lo, threads):
    use_path(path)
    cpu.set_num_threads(threads)
    g = torch.Generator().manual_seed(H * 1000 + pos)
    cap = pos + 3
    q, k, v = (torch.randn(n * hd, generator=g) for n in (H, KV, KV))
    kc = torch.randn(1, KV, cap, hd, generator=g)
    vc = torch.randn(1, KV, cap, hd, generator=g)
    ang = torch.rand(hd // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat([ang, ang]).cos().float(), torch.cat([ang, ang]).sin().float()
    y_ref, k_ref, v_ref = attend64(q, k, v, kc[0], vc[0], pos, cos, sin, lo)
    before = kc.clone()
    y = cpu.attend_one(q, k, v, kc, vc, pos, cos, sin, lo)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc[0, :, pos].double(), k_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(vc[0, :, pos].double(), v_ref)
    kc2, vc2 = before.clone(), vc.clone()                             # [q | k | v] stacked: the same
    y2 = cpu.attend_one(torch.cat([q, k, v]), None, None, kc2, vc2, pos, cos, sin, lo)
    assert torch.equal(y2, y) and torch.equal(kc2, kc) and torch.equal(vc2, vc)
    keep = torch.ones(cap, dtype=torch.bool)
    keep[pos] = False
    assert torch.equal(kc[0][:, keep], before[0][:, keep])          # only position pos written


def test_attend_one_rejects_bad_input():
    kc = torch.zeros(2, 8, 16)
    q, k = torch.zeros(4 * 16), torch.zeros(2 * 16)
    cs = torch.zeros(16)
    with pytest.raises(ValueError, match="lo"):
        cpu.attend_one(q, k, k, kc, kc.clone(), 8, cs, cs)
    with pytest.raises(ValueError, match="multiple"):
        cpu.attend_one(torch.zeros(40), k, k, kc, kc.clone(), 1, cs, cs)
    with pytest.raises(ValueError, match="float32"):
        cpu.attend_one(q.double(), k, k, kc, kc.clone(), 1, cs, cs)


@pytest.mark.parametrize("shape", [(4096,), (3, 256), (1, 1, 96)])
def test_rms_norm_matches_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    ref = w.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-5).double(), ref, rtol=1e-5, atol=1e-6)
    r = torch.randn(shape, generator=g)                       # the residual form: (r + x, norm)
    s64 = r.double() + x.double()
    ref = w.double() * s64 / (s64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    s, y = cpu.rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(s, r + x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


def test_model_cpu_decode_uses_native_ops_and_matches_torch(monkeypatch):
    """A float32 CPU model's decode (native rms_norm + attend_one) equals the same model with the
    native ops switched off (torch's ops), token after token, sliding window included."""
    from hybridinfer import model as M
    from hybridinfer.bench.workload import SynthCheckpoint, make_workload
    from dataclasses import replace
    wl = make_workload("T7", None, 0)
    cfg = replace(wl.cfg, sliding_window=5)
    m = M.build_model(cfg, SynthCheckpoint(cfg, 0, "cpu", torch.float32), torch.device("cpu"),
                      torch.float32, with_predictors=False)
    calls = []
    real = cpu.attend_one
    monkeypatch.setattr(cpu, "attend_one", lambda *a, **k: calls.append(1) or real(*a, **k))
    toks = [3, 17, 250, 9, 4, 77, 31, 2]
    out = {}
    for native in (True, False):
        monkeypatch.setattr(M, "_native_f32", lambda *t, on=native: on and all(
            x.device.type == "cpu" and x.dtype == torch.float32 for x in t))
        cache = m.new_cache(16)
        m(torch.tensor([toks[:3]]), cache)                              # prefill: torch's path
        out[native] = torch.stack([m(torch.tensor([[t]]), cache)[0, -1] for t in toks[3:]])
    assert len(calls) == cfg.num_layers * len(toks[3:])
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)


def test_cpu_qkv_is_one_stacked_packed_linear():
    """On the CPU kernels q, k, v are views of one PackedLinear (one native call); the stacked
    call gives each part's own rows' results, and those equal the float64 projection within the
    kernels' q4_0 bound."""
    from hybridinfer import model as M
    from hybridinfer import quant
    from hybridinfer.bench.workload import SynthCheckpoint, make_workload
    wl = make_workload("T7", None, 0)
    ck = SynthCheckpoint(wl.cfg, 0, "cpu", torch.float32)
    m = M.build_model(wl.cfg, ck, torch.device("cpu"), torch.float32, with_predictors=False,
                      cpu_linear_fmt="q4_0")
    a = m.blocks[1].attn
    assert isinstance(a.qkv, cpu.PackedLinear) and a.qkv.out_features == sum(
        p.out_features for p in (a.q, a.k, a.v))
    assert a.q.weight.data_ptr() == a.qkv.weight.data_ptr()
    assert a.v.weight.data_ptr() + a.v.weight.numel() == a.qkv.weight.data_ptr() + a.qkv.weight.numel()
    x = torch.randn(1, 1, wl.cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    fused = a.project_qkv(x)
    for part, y in zip((a.q, a.k, a.v), fused):
        torch.testing.assert_close(y.reshape(-1), cpu.linear(x.reshape(-1), part), rtol=0, atol=0)
        W = quant.unpack(part.rows(), "q4_0", part.in_features).double()   # grouped rows
        ref = W @ x.reshape(-1).double()
        torch.testing.assert_close(y.reshape(-1).double(), ref, rtol=0.02, atol=0.02 * float(ref.abs().max()))


@pytest.mark.parametrize("sparsity", ["predictor", "dense", "exact"])
def test_cpu_only_ffn_one_token_path(sparsity):
    """HybridFFN with every row on the CPU, one float32 token: the bound ColdStep path equals the
    kernel on the mask's ids (and the float64 FFN on them within the q4_0 tolerance); outputs of
    successive calls are independent tensors."""
    from hybridinfer import quant
    from hybridinfer.ffn import HybridFFN, activate
    g = torch.Generator().manual_seed(11)
    n, d = 200, 128
    w1, w3, w2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(d, n, generator=g)
    cold = cpu.PackedFFN.from_weights(w1, w3, w2, "q4_0")

    class Pred:
        device = torch.device("cpu")
        threshold = 0.0

        def __init__(self):
            self.masks = []

        def active(self, x):
            m = torch.rand(x.shape[0], n, generator=g) < 0.3
            self.masks.append(m[0])
            return m
    pred = Pred()
    f = HybridFFN(n, None, cold, torch.arange(n), "relu", 0.0, sparsity,
                  pred if sparsity == "predictor" else None, torch.device("cpu"))
    ys, refs = [], []
    for _ in range(3):
        x = torch.randn(1, d, generator=g)
        ys.append(f(x))
        ids = (torch.nonzero(pred.masks[-1]).flatten() if sparsity == "predictor"
               else torch.arange(n)).to(torch.int32)
        refs.append(cpu.ffn_sparse(cold, x[0], ids, "relu", exact=sparsity == "exact"))
        W1, W3, W2t = (quant.unpack(t, "q4_0", d).double() for t in (cold.gate, cold.up, cold.down_t))
        a = activate(W1[ids.long()] @ x[0].double(), W3[ids.long()] @ x[0].double(), "relu")
        ref64 = a @ W2t[ids.long()]
        torch.testing.assert_close(ys[-1][0].double(), ref64, rtol=0.05, atol=0.05 * float(ref64.abs().max()))
    for y, r in zip(ys, refs):
        assert y.shape == (1, d)
        torch.testing.assert_close(y[0], r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [None, 4])
def test_attn_step_equals_the_separate_calls(monkeypatch, window):
    """A CPU model with packed q4_0 attention: one token's attention half through the bound
    AttnStep (one native call) gives the logits of the same native ops called one by one, token
    after token (sliding window included), and is rebound for a new cache."""
    from dataclasses import replace
    from hybridinfer import model as M
    from hybridinfer.bench.workload import SynthCheckpoint, make_workload
    wl = make_workload("T7", None, 0)
    cfg = replace(wl.cfg, sliding_window=window)
    m = M.build_model(cfg, SynthCheckpoint(cfg, 0, "cpu", torch.float32), torch.device("cpu"),
                      torch.float32, with_predictors=False, cpu_linear_fmt="q4_0")
    toks = [5, 9, 300, 2, 41, 7, 19]
    out, used = {}, []
    real = M.Block.cpu_step
    for on in (True, False, True):
        monkeypatch.setattr(M.Block, "cpu_step", lambda self, *a, on=on: (
            used.append(1) or real(self, *a)) if on else None)
        cache = m.new_cache(12)
        m(torch.tensor([toks[:2]]), cache)
        out.setdefault(on, []).append(
            torch.stack([m(torch.tensor([[t]]), cache)[0, -1] for t in toks[2:]]))
    assert all(s[1] is not None for s in (b._step for b in m.blocks))
    assert len(used) == 2 * cfg.num_layers * (len(toks) - 2) + 2 * cfg.num_layers   # + prefill checks
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[True][0], out[True][1])                                 # new cache: rebound


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "f32"])
def test_relu_mlp_t_matches_float64(path, fmt):
    """kernels.cpu.relu_mlp_t (fc1, relu, fc2 over W2^T's rows) against float64 on the
    dequantised rows, with x quantised as the kernels do for block formats."""
    from hybridinfer import quant
    from test_kernels_cpu import x_effective
    use_path(path)
    g = torch.Generator().manual_seed(3)
    d, r, n2 = 96, 70, 160
    fc1 = cpu.PackedLinear.from_weight(torch.randn(r, d, generator=g), fmt)
    fc2t = cpu.PackedLinear.from_weight(torch.randn(r, n2, generator=g), fmt, grouped=False)
    x = torch.randn(d, generator=g)
    W1 = quant.unpack(fc1.rows(), fmt, d).double()                   # q4_0 fc1: grouped rows
    W2t = quant.unpack(fc2t.weight, fmt, n2).double()
    h = (W1 @ x_effective(x, fmt)).clamp_min(0)
    ref = h @ W2t
    assert 0 < int((h > 0).sum()) < r                       # some rows skipped, some read
    y = cpu.relu_mlp_t(x, fc1, fc2t)
    torch.testing.assert_close(y.double(), ref, rtol=0.02, atol=0.02 * float(ref.abs().max()))
    if fmt == "q4_0":                                       # fc2t's rows go through the AXPY
        with pytest.raises(ValueError, match="fc2t must be plain"):
            cpu.relu_mlp_t(x, fc1, cpu.PackedLinear.from_weight(torch.randn(r, n2, generator=g), fmt))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "f32"])
def test_rows_axpy_matches_float64(path, fmt):
    """kernels.cpu.rows_axpy (a batch of coefficient rows over a matrix stored as its transpose's
    packed rows; rows whose coefficients are all zero are skipped) against float64, for one and
    several rows of coefficients with zero columns; its errors."""
    from hybridinfer import quant
    use_path(path)
    g = torch.Generator().manual_seed(5)
    r, n2 = 70, 160
    m = cpu.PackedLinear.from_weight(torch.randn(r, n2, generator=g), fmt, grouped=False)
    W = quant.unpack(m.weight, fmt, n2).double()
    tol = 0.02 if fmt == "q4_0" else 1e-5      # the q4_0 AXPY rounds its coefficients (integer maths)
    for b in (1, 4):
        a = torch.randn(b, r, generator=g).clamp_min(0)     # relu's output: about half zero
        a[:, 7] = 0.0                                        # a row no token uses
        ref = a.double() @ W
        y = cpu.rows_axpy(a, m)
        assert y.shape == (b, n2)
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    torch.testing.assert_close(cpu.rows_axpy(a[0], m).double(), ref[0], rtol=tol,
                               atol=tol * float(ref.abs().max()))       # 1-D a -> 1-D y
    with pytest.raises(ValueError, match="expected shape"):
        cpu.rows_axpy(torch.zeros(2, r + 1), m)
    if fmt == "q4_0":
        with pytest.raises(ValueError, match="plain rows"):
            cpu.rows_axpy(a, cpu.PackedLinear.from_weight(torch.randn(r, n2, generator=g), fmt))


def test_predictor_takes_fc2_or_fc2t():
    from hybridinfer.predictor import Predictor
    fc1 = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one of them"):
        Predictor(fc1, None)
    with pytest.raises(ValueError, match="one of them"):
        Predictor(fc1, torch.randn(16, 4), fc2t=cpu.PackedLinear.from_weight(torch.randn(4, 32), "f32"))


@pytest.mark.parametrize("policy", ["cpu-dense", "cpu-sparse"])
def test_model_cpu_plan_equals_the_block_path(monkeypatch, policy):
    """A CPU-only hybrid model (the benchmark's cpu-dense / cpu-sparse on T7): one-token decode
    through the bound plan (Transformer._cpu_plan: two native calls a layer) gives the logits of
    the Block-by-Block path, token after token (two builds from one seed: the same masks)."""
    from hybridinfer.bench.decode_policies import build
    from hybridinfer.bench.workload import make_workload
    toks = [3, 40, 7, 300, 12, 5]
    out = {}
    for on in (True, False):
        wl = make_workload("T7", None, 0)
        m = build(policy, wl, torch.device("cpu"), torch.float32, torch.float32).model
        if not on:
            monkeypatch.setattr(m, "_cpu_plan", lambda cache: None)
        cache = m.new_cache(16)
        m(torch.tensor([toks[:2]]), cache)
        out[on] = torch.stack([m(torch.tensor([[t]]), cache)[0, -1] for t in toks[2:]])
        assert cache.length == len(toks)
        if on:
            assert m._plan[1] is not None and len(m._plan[1]) == wl.cfg.num_layers
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
