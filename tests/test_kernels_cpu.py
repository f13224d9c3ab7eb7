"""hybridinfer.kernels.cpu against a float64 reference computed here, on both dispatch paths.

Error model (docs/KERNELS.md): for q8_0 / q4_0 weights the kernels quantise x to q8 per
32-block (f32 scale amax/127, round half to even); the reference does the same in numpy and
then works in float64 on the dequantised weights, so what remains is f32 rounding. Every check
is |y - y_ref| <= bound, elementwise, with the bound propagated from the dots through the
activation to the down sum (TOL = relative f32 accumulation error per sum of |terms|).
q4_0's down step also quantises its row coefficients to int8 per group of 8 rows and 32-column
block (csrc/kernels.h): q4_down_bound adds that error, and the scalar reference, which does the
same quantised arithmetic, is compared with the AVX2 kernel tightly.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hybridinfer import quant
from hybridinfer.kernels import cpu

TOL = 2e-5
ACTS = ("drelu", "relu", "fatrelu", "silu")
PATHS = ("avx2", "scalar") if cpu._native().cpu_has_avx2() else ("scalar",)


@pytest.fixture(autouse=True)
def _restore_dispatch():
    yield
    cpu.force_reference(False)
    cpu.set_num_threads(2)


def use_path(path):
    cpu.force_reference(path == "scalar")
    assert cpu.isa() == path


def x_effective(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The x the kernels multiply with: as is for float formats, q8-quantised for q8_0/q4_0."""
    if fmt not in ("q8_0", "q4_0"):
        return x.double()
    xb = x.numpy().astype(np.float32).reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 1e-30, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[:, None])  # f32 product, round half to even (cvtps2dq)
    d = np.where(amax > 1e-30, d, 0).astype(np.float64)
    return torch.from_numpy(q.astype(np.float64) * d[:, None]).reshape(x.shape)


def reference(ffn, x, ids, act, thr=0.0, scale=None):
    """(y, bound) in float64. x [b, d] f32; scale: None or [b]."""
    W1, W3, W2t = (quant.unpack(m[ids.long()], ffn.fmt, ffn.d_model).double()
                   for m in (ffn.gate, ffn.up, ffn.down_t))          # [k, d] each
    xe = torch.stack([x_effective(xt, ffn.fmt) for xt in x])          # [b, d]
    g, u = xe @ W1.T, xe @ W3.T                                       # [b, k]
    dg, du = TOL * (xe.abs() @ W1.abs().T), TOL * (xe.abs() @ W3.abs().T)
    if act == "silu":
        ga = g * torch.sigmoid(g)
        a = ga * u
        da = 1.1 * dg * (u.abs() + du) + (ga.abs() + 1.1 * dg) * du
    else:
        t = 0.0 if act in ("drelu", "relu") else thr
        on = g > t
        uu = torch.relu(u) if act == "drelu" else u
        a = torch.where(on, g * uu, torch.zeros_like(g))
        da = dg * (uu.abs() + du) + (g.abs() + dg) * du
        flip = (g - t).abs() <= dg                                    # may fall either side
        da = torch.where(flip, (g.abs() + dg) * (u.abs() + du), da)
    da = da + TOL * a.abs()
    if scale is not None:
        a, da = a * scale[:, None], da * scale.abs()[:, None]
    y = a @ W2t
    bound = da @ W2t.abs() + TOL * (a.abs() @ W2t.abs()) + 1e-30
    if ffn.fmt == "q4_0":
        bound = bound + q4_down_bound(ffn.down_t[ids.long()], a.abs() + da, known_nonzero=a.abs() > da)
    return y, bound


GROUP = 8  # rows per coefficient quantisation group of the q4_0 down (kAxpyGroup)


def q4_down_bound(rows, mag, known_nonzero=None):
    """Elementwise bound [b, d] on the q4_0 down's coefficient quantisation (docs/KERNELS.md).

    rows: packed q4_0 down rows [k, row_bytes] in the order the kernel gets them; mag [b, k]:
    upper bounds of |coefficient|. Per token, group of <= 8 rows that reach one AXPY pass, and
    block i, coefficient s_r = c_r d_ri becomes (gm/127) q_r with |error| <= gm/254, gm =
    max |s| over the group; the term of row r is that times |n_rj - 8|. Which rows share a group
    depends on chunking and on skipped zero rows, so gm is bounded by the max over every row that
    can share r's group: at most 6 rows that are surely passed (known_nonzero for some token; all
    rows when None) lie strictly between two rows of one group.
    """
    k = rows.shape[0]
    b = mag.shape[0]
    if k == 0:
        return 0.0
    nb = rows.shape[1] // 18
    blk = rows.reshape(k, nb, 18)
    dsc = blk[..., :2].contiguous().view(torch.float16).double().abs().reshape(k, nb)
    surely = torch.ones(k, dtype=torch.bool) if known_nonzero is None else known_nonzero.any(0)
    before = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(surely.long(), 0)])  # in [0, j)
    # row j's window: rows j' with at most GROUP - 2 sure rows strictly between j and j'
    lo = torch.searchsorted(before[1:], before[:k] - (GROUP - 2))
    hi = torch.searchsorted(before[:k], before[1:] + (GROUP - 2), right=True) - 1
    s = mag.double()[:, :, None] * dsc[None]                                      # [b, k, nb]
    M = torch.empty_like(s)
    for j in range(k):
        M[:, j] = s[:, int(lo[j]):int(hi[j]) + 1].amax(1)
    out = torch.zeros(b, nb, 32, dtype=torch.float64)
    for j0 in range(0, k, 1024):  # bounded memory at the real shape
        q = blk[j0:j0 + 1024, :, 2:]
        dev = (torch.cat([q & 0x0F, q >> 4], dim=-1).double() - 8).abs()             # |n - 8| [k', nb, 32]
        out += torch.einsum("tki,kic->tic", M[:, j0:j0 + 1024] * (1 / 254 + 1e-5), dev)
    return out.reshape(b, nb * 32)


def assert_within(y, ref, bound, what=""):
    y = torch.as_tensor(y).double()
    err = (y - ref).abs()
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.3g} x the bound (max abs err {float(err.max()):.3g})"


_CACHE = {}


def make_ffn(fmt, d, n, seed=0):
    key = (fmt, d, n, seed)
    if key not in _CACHE:
        g = torch.Generator().manual_seed(seed)
        w1, w3 = (torch.randn(n, d, generator=g) * d ** -0.5 for _ in range(2))
        w2 = torch.randn(d, n, generator=g) * n ** -0.5
        _CACHE[key] = cpu.PackedFFN.from_weights(w1, w3, w2, fmt)
    return _CACHE[key]


def id_set(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "empty":
        return torch.zeros(0, dtype=torch.int64)
    if kind == "one":
        return torch.tensor([n - 1], dtype=torch.int32)
    if kind == "all":
        return torch.arange(n, dtype=torch.int32)
    return torch.randperm(n, generator=g)[: max(1, n // 3)]  # random order, int64


def pick_threshold(g):
    """A fatrelu threshold in the widest gap of the gate values (no id sits on the edge)."""
    v = torch.sort(g.flatten()).values
    if v.numel() < 2:
        return 0.1
    i = int(torch.argmax(v[1:] - v[:-1]))
    return float((v[i] + v[i + 1]) / 2)


SHAPES = [(64, 37), (96, 129), (70, 33)]  # d = 70: tails in the float formats only


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", ["empty", "one", "all", "random"])
def test_ffn_sparse_matches_reference(path, fmt, act, kind):
    use_path(path)
    for si, (d, n) in enumerate(SHAPES):
        if d % 32 and fmt in ("q8_0", "q4_0"):
            continue
        ffn = make_ffn(fmt, d, n)
        for b in (1, 7):  # 7 tokens: the 4-, 2- and 1-token tiles
            x = torch.randn(b, d, generator=torch.Generator().manual_seed(100 + b + si))
            ids = id_set(kind, n, seed=si + b)
            thr = 0.0
            if act == "fatrelu" and ids.numel():
                thr = pick_threshold(x.double() @ quant.unpack(ffn.gate, fmt, d).double().T)
            ref, bound = reference(ffn, x, ids, act, thr)
            for exact in (False, True):
                y = cpu.ffn_sparse(ffn, x, ids, act, thr, exact)
                assert y.shape == (b, d)
                assert_within(y, ref, bound, f"{fmt} {act} {kind} d={d} n={n} b={b} exact={exact}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_gate_up_and_down_lowlevel(path, fmt):
    use_path(path)
    d, n = 96, 129
    ffn = make_ffn(fmt, d, n)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(5))
    ids = id_set("random", n, 5)
    a = cpu.gate_up_sparse(ffn, x, ids, "drelu")
    assert a.shape == (3, ids.numel())
    W1, W3 = (quant.unpack(m[ids], fmt, d).double() for m in (ffn.gate, ffn.up))
    xe = torch.stack([x_effective(xt, fmt) for xt in x])
    ref = torch.relu(xe @ W1.T) * torch.relu(xe @ W3.T)
    scale = (xe.abs() @ W1.abs().T) * (xe.abs() @ W3.abs().T)
    assert ((a.double() - ref).abs() <= 3 * TOL * scale + 1e-30).all()
    a_exact = cpu.gate_up_sparse(ffn, x, ids, "drelu", exact=True)
    assert torch.equal(a_exact, a)  # the same dots; only skipped work differs
    y = cpu.down_sparse(ffn, a, ids)
    W2t = quant.unpack(ffn.down_t[ids], fmt, d).double()
    yref = a.double() @ W2t
    dbound = TOL * (a.double().abs() @ W2t.abs()) + 1e-30
    if fmt == "q4_0":
        dbound = dbound + q4_down_bound(ffn.down_t[ids], a.abs())
    assert_within(y, yref, dbound, "down")
    y1 = cpu.down_sparse(ffn, a[0], ids, skip_zero=True)            # 1-D a -> 1-D y
    assert y1.shape == (d,)
    assert_within(y1[None], yref[:1], dbound[:1] if fmt != "q4_0" else
                  TOL * (a[:1].double().abs() @ W2t.abs()) + 1e-30 +
                  q4_down_bound(ffn.down_t[ids], a[:1].abs(), known_nonzero=a[:1] != 0), "down skip_zero")


@pytest.mark.parametrize("d", [352, 4192])  # 11 blocks (8 + a tail of 3), 131 (a 128-block pass + 3)
def test_q4_down_integer_coefficients(d):
    """q4_0 down: the AVX2 kernel against the scalar reference (the same int8 coefficient
    quantisation, so only float rounding differs) and both against float64 with the documented
    bound; 37 rows = groups of 8 and a group of 5; 1 and 3 tokens; coefficients spanning 10^4."""
    n = 64
    ffn = make_ffn("q4_0", d, n, seed=21)
    ids = id_set("random", n, 3)[:37]
    g = torch.Generator().manual_seed(22)
    for b in (1, 3):
        a = torch.randn(b, ids.numel(), generator=g) * 10.0 ** (torch.rand(b, ids.numel(), generator=g) * 4 - 2)
        a[:, ::5] = 0.0
        cpu.set_num_threads(1)  # one chunk order: the same groups on both paths
        ys = {}
        for path in PATHS:
            use_path(path)
            ys[path] = cpu.down_sparse(ffn, a, ids)
        W2t = quant.unpack(ffn.down_t[ids], "q4_0", d).double()
        fl = TOL * (a.double().abs() @ W2t.abs()) + 1e-30
        bound = fl + q4_down_bound(ffn.down_t[ids], a.abs())
        for path, y in ys.items():
            assert_within(y, a.double() @ W2t, bound, f"{path} d={d} b={b}")
        if len(ys) == 2:
            assert_within(ys["avx2"], ys["scalar"].double(), fl, f"avx2 vs scalar d={d} b={b}")
        # the bound is not vacuous: leaving out the largest row's term exceeds it somewhere
        big = int(a[0].abs().argmax())
        part = a.double() @ W2t - a.double()[:, big:big + 1] * W2t[big]
        assert float(((ys["scalar"].double() - part).abs() / bound).max()) > 1.0


@pytest.mark.parametrize("d", [256, 288, 352, 544, 4192])
def test_q4_dot2_groups_of_8_blocks(d):
    """One token, exact=False: the AVX2 dot2 reads GGUF q4_0 rows 8 blocks at a time (XPrep::xh,
    hadd16 reduction), then the pair loop and an odd block for the rest (d = 288: 1 group + 1
    block, 352: + 3, 544: 2 groups + 1, 4192: 16 groups + 3). Against float64 on both paths at 1
    and 2 threads, and the AVX2 gate/up values against the scalar reference's at the float bound
    (gate_up_sparse on one id set vs the fused FFN is not comparable, so through `linear` of the
    same GGUF rows, which takes dot2 for row pairs)."""
    n = 41
    ffn = make_ffn("q4_0", d, n, seed=d)
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(d + 1))
    for kind in ("all", "random"):
        ids = id_set(kind, n, d)
        ref, bound = reference(ffn, x, ids, "drelu")
        for t in (1, 2):
            cpu.set_num_threads(t)
            for path in PATHS:
                use_path(path)
                assert_within(cpu.ffn_sparse(ffn, x, ids), ref, bound, f"{kind} {path} d={d} threads={t}")
    m = cpu.PackedLinear("q4_0", d, n, ffn.gate)                 # GGUF rows: dot2 in pairs
    W = quant.unpack(ffn.gate, "q4_0", d).double()
    xe = x_effective(x[0], "q4_0")
    lref, lbound = W @ xe, TOL * (W.abs() @ xe.abs()) + 1e-30
    for path in PATHS:
        use_path(path)
        assert_within(cpu.linear(x[0], m), lref, lbound, f"linear {path} d={d}")


@pytest.mark.parametrize("d", [4192, 288])
@pytest.mark.parametrize("k", [7, 9, 65, 129, 300, 449])
def test_q4_axpy_next_group_prefetch(k, d):
    """The FFN and down drivers hand each q4_0 AXPY group the next group's rows to prefetch
    (kernels.h AxpyFn pf): at group and chunk boundaries, on the one-token fused path
    (ffn_sparse, b = 1, exact=False) and through down_sparse with skipped zero rows (the next
    group found past them); chunks of 4-64 ids, so the larger k have groups with a next one in
    their chunk. AVX2 and the scalar reference (no prefetch) agree at the float bound
    with one thread (the same groups) and are within the float64 bound at 1 and 2 threads.
    The AVX2 kernel prefetches the next rows during its second pass (every even block of a
    chunk): d = 4192 is 131 blocks (a 128-block pass and an odd tail), 288 is 9 (one record of 8
    blocks and one single)."""
    n = 1400
    ffn = make_ffn("q4_0", d, n, seed=31)
    ids = id_set("random", n, 31)[:k]
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(32))
    ref, bound = reference(ffn, x, ids, "drelu")
    a = torch.randn(1, k, generator=torch.Generator().manual_seed(33))
    a[:, 1::3] = 0.0
    W2t = quant.unpack(ffn.down_t[ids.long()], "q4_0", d).double()
    fl = TOL * (a.double().abs() @ W2t.abs()) + 1e-30
    dbound = fl + q4_down_bound(ffn.down_t[ids.long()], a.abs(), known_nonzero=a != 0)
    for t in (1, 2):
        cpu.set_num_threads(t)
        ys, ds = {}, {}
        for path in PATHS:
            use_path(path)
            ys[path] = cpu.ffn_sparse(ffn, x, ids)
            ds[path] = cpu.down_sparse(ffn, a, ids, skip_zero=True)
            assert_within(ys[path], ref, bound, f"ffn {path} k={k} threads={t}")
            assert_within(ds[path], a.double() @ W2t, dbound, f"down {path} k={k} threads={t}")
        if t == 1 and len(PATHS) == 2:
            assert_within(ds["avx2"], ds["scalar"].double(), fl, f"down avx2 vs scalar k={k}")


@pytest.mark.parametrize("path", PATHS)
def test_multi_expert_one_call(path):
    use_path(path)
    d, b = 64, 5
    ffns = [make_ffn("q4_0", d, 45, seed=1), make_ffn("f16", d, 30, seed=2),
            make_ffn("q8_0", d, 45, seed=3)]
    x = torch.randn(b, d, generator=torch.Generator().manual_seed(9))
    ids = [id_set("random", 45, 1), id_set("all", 30, 0), id_set("empty", 45, 0)]
    per_token = torch.rand(3, b, generator=torch.Generator().manual_seed(10))
    for scales in ([0.7, 0.3, 2.0], per_token):
        sc = torch.as_tensor(scales, dtype=torch.float64)
        sc = sc[:, None].expand(3, b) if sc.dim() == 1 else sc
        ref, bound = 0, 0
        for e in range(3):
            r, bd = reference(ffns[e], x, ids[e], "drelu", scale=sc[e])
            ref, bound = ref + r, bound + bd
        for exact in (False, True):
            y = cpu.ffn_sparse_multi(ffns, x, ids, scales, "drelu", exact=exact)
            assert_within(y, ref, bound, f"multi exact={exact}")


REAL = (4096, 14336)


def random_packed(fmt, n, d, seed):
    """A valid packed matrix without the cost of packing: random payload, sane scales."""
    g = torch.Generator().manual_seed(seed)
    if fmt in ("f32", "f16", "bf16"):
        return quant.pack(torch.randn(n, d, generator=g) * d ** -0.5, fmt)
    bb = 34 if fmt == "q8_0" else 18
    p = torch.randint(0, 256, (n, d // 32, bb), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, d // 32, generator=g) + 0.5) * (0.3 / 8 if fmt == "q4_0" else 0.02 / 127 * 3)
    p[..., :2] = scales.to(torch.float16).view(torch.uint8).reshape(n, d // 32, 2)
    return p.reshape(n, -1)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_real_shape(fmt):
    """TurboSparse's FFN shape (4096 x 14336): 10% random ids; all ids for f16 and q4_0."""
    d, n = REAL
    ffn = cpu.PackedFFN(fmt, d, n, *(random_packed(fmt, n, d, s) for s in (1, 2, 3)))
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(4))
    cases = [id_set("random", n, 7)[: n // 10]]
    if fmt in ("f16", "q4_0"):
        cases.append(id_set("all", n, 0))
    for ids in cases:
        ref, bound = reference(ffn, x, ids, "drelu")
        cpu.set_num_threads(2)
        assert_within(cpu.ffn_sparse(ffn, x, ids), ref, bound, f"{fmt} k={ids.numel()}")
        # one token (exact=False): q8_0 / q4_0 take the fused gate+up pass (Kernels::dot2,
        # which also prefetches the down row and the next id's rows). Token 0's rows of the
        # 2-token reference: every id is passed, so the q4_0 groups are within its bound.
        for t in (1, 2):
            cpu.set_num_threads(t)
            assert_within(cpu.ffn_sparse(ffn, x[:1], ids), ref[:1], bound[:1],
                          f"{fmt} k={ids.numel()} b=1 threads={t}")
    if fmt == "q4_0":  # the scalar reference at full size, once
        use_path("scalar")
        ref, bound = reference(ffn, x[:1], cases[0], "drelu")
        assert_within(cpu.ffn_sparse(ffn, x[:1], cases[0]), ref, bound, "q4_0 scalar real shape")


@pytest.mark.parametrize("fmt", ["f16", "q4_0", "bf16"])
def test_threads_agree(fmt):
    d, n = 128, 1000
    ffn = make_ffn(fmt, d, n)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(11))
    ids = id_set("random", n, 11)
    ref, bound = reference(ffn, x, ids, "silu")
    outs = {}
    for t in (1, 2, 5):
        cpu.set_num_threads(t)
        assert cpu.get_num_threads() == t
        outs[t] = cpu.ffn_sparse(ffn, x, ids, "silu")
        assert_within(outs[t], ref, bound, f"{t} threads")
    # Between thread counts the order of the down sums changes (and for q4_0 the grouping of
    # the down rows whose coefficients are quantised together): both are within the bound.
    assert_within(outs[5], outs[1].double(), 2 * bound, "5 vs 1 threads")
    cpu.set_num_threads(1)
    assert torch.equal(cpu.ffn_sparse(ffn, x, ids, "silu"), outs[1])  # deterministic at 1 thread


def test_decode_step_on_a_wide_pool():
    """One token, two experts, few rows of d = 4096 on 8 threads (the GPU machine's cold half:
    the in-job wait for every chunk, then slices of columns claimed dynamically): within the
    float64 bound, and equal to one thread's result within twice the bound."""
    d, n = 4096, 512
    ffns = [make_ffn("q4_0", d, n, seed=s) for s in (21, 22)]
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(23))
    ids = [id_set("random", n, s)[:37] for s in (24, 25)]
    scales = [0.7, 0.3]
    ref = torch.zeros(1, d, dtype=torch.float64)
    bound = torch.zeros(1, d, dtype=torch.float64)
    for f, i, sc in zip(ffns, ids, scales):
        r, b = reference(f, x, i, "drelu", scale=torch.tensor([sc], dtype=torch.float64))
        ref, bound = ref + r, bound + b
    outs = {}
    for t in (8, 1):
        cpu.set_num_threads(t)
        outs[t] = cpu.ffn_sparse_multi(ffns, x, ids, [[s] for s in scales], "drelu")
        assert_within(outs[t], ref, bound, f"{t} threads")
    assert_within(outs[8], outs[1].double(), 2 * bound, "8 vs 1 threads")
    cpu.set_num_threads(2)


def test_dispatch_paths_agree_and_env_var():
    ffn = make_ffn("q4_0", 64, 37)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    ids = id_set("all", 37, 0)
    use_path("scalar")
    assert cpu.reference_forced()
    ys = cpu.ffn_sparse(ffn, x, ids)
    cpu.force_reference(False)
    assert cpu.isa() in ("avx2", "scalar")
    ref, bound = reference(ffn, x, ids, "drelu")
    assert_within(cpu.ffn_sparse(ffn, x, ids), ys.double(), 2 * bound, "avx2 vs scalar")
    code = "from hybridinfer.kernels import cpu; print(cpu.isa(), cpu.reference_forced())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HYBRIDINFER_FORCE_REF": "1"}).stdout.split()
    assert out == ["scalar", "True"]


def test_numpy_in_numpy_out_and_1d():
    ffn = make_ffn("f16", 64, 37)
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    ids = np.array([3, 1, 30], dtype=np.int64)
    y = cpu.ffn_sparse(ffn, x, ids)
    assert isinstance(y, np.ndarray) and y.shape == (64,)
    ref, bound = reference(ffn, torch.from_numpy(x)[None], torch.from_numpy(ids), "drelu")
    assert_within(torch.from_numpy(y)[None], ref, bound, "numpy")


def test_read_sum():
    buf = torch.arange(3_000_001, dtype=torch.float32) % 7
    assert cpu.read_sum(buf) == pytest.approx(float(buf.double().sum()), rel=1e-6)


def test_errors_are_clear_value_errors():
    ffn = make_ffn("q4_0", 64, 37)
    x = torch.randn(64)
    ok = torch.tensor([0, 5], dtype=torch.int32)
    bad = [
        (lambda: cpu.ffn_sparse(ffn, x, torch.tensor([0, 37])), "out of range"),
        (lambda: cpu.ffn_sparse(ffn, x, torch.tensor([-1])), "out of range"),
        (lambda: cpu.ffn_sparse(ffn, x, torch.tensor([4, 2, 4])), "duplicated"),
        (lambda: cpu.ffn_sparse(ffn, x, torch.tensor([2 ** 32 + 1])), "out of range"),
        (lambda: cpu.ffn_sparse(ffn, x, torch.tensor([0.0, 1.0])), "int32/int64"),
        (lambda: cpu.ffn_sparse(ffn, x.double(), ok), "float32"),
        (lambda: cpu.ffn_sparse(ffn, torch.randn(65), ok), "shape"),
        (lambda: cpu.ffn_sparse(ffn, torch.randn(64, 2).t(), ok), "shape|contiguous"),
        (lambda: cpu.ffn_sparse(ffn, torch.randn(2, 128)[:, ::2], ok), "contiguous"),
        (lambda: cpu.ffn_sparse(ffn, x, ok, act="gelu"), "activation"),
        (lambda: cpu.ffn_sparse_multi([ffn, ffn], x, [ok]), "one id set per FFN"),
        (lambda: cpu.ffn_sparse_multi([ffn], x, [ok], scales=[1.0, 2.0]), "scales"),
        (lambda: cpu.ffn_sparse_multi([ffn, make_ffn("f16", 96, 37)], x, [ok, ok]), "d_model"),
        (lambda: cpu.down_sparse(ffn, torch.randn(3), ok), "shape"),
        (lambda: cpu.PackedFFN("q4_0", 64, 37, ffn.gate, ffn.up, ffn.down_t[:5]), "down_t"),
        (lambda: cpu.PackedFFN("q4_0", 64, 37, ffn.gate.float(), ffn.up, ffn.down_t), "gate"),
        (lambda: cpu.PackedFFN("q3", 64, 37, ffn.gate, ffn.up, ffn.down_t), "format"),
        (lambda: cpu.PackedFFN.from_weights(torch.randn(8, 64), torch.randn(8, 64),
                                            torch.randn(8, 64), "f16"), "w2"),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn()
    assert cpu.ffn_sparse(ffn, x, ok).shape == (64,)  # still fine afterwards
