"""The CPU kernels' thread pool (csrc/threadpool.{h,cpp}) under oversubscription and contention.

ThreadPool::run's contract: fn(0) runs on the caller, any subset of the workers enters while
the caller's share runs (each at most once per job), a worker that wakes after the caller closed
the job skips it. So every pool user must give the same result however many threads took part:
here each call goes through the pool (weights above the serial threshold of ffn.cpp's on_caller:
256 KiB for pools of <= 2 threads, 32 KiB above) on pools of 16 and 3 threads on the 2-core
machine (workers wake late, some jobs are closed before they arrive), 2 and 1, many times in a
row; and on 2 / 3 threads with a busy process taking a core. Results against the float64
references of test_kernels_cpu / test_cpu_linear / test_cpu_decode_ops; per-row results that do
not depend on which thread computed them (linear, attend_one) must also be bit-identical.
Correctness only: nothing here is timed.
"""
import subprocess
import sys

import pytest
import torch

from hybridinfer import quant
from hybridinfer.kernels import cpu

from test_cpu_decode_ops import attend64
from test_cpu_linear import reference as linear_reference
from test_kernels_cpu import TOL, assert_within, id_set, make_ffn, q4_down_bound, reference

pytestmark = pytest.mark.usefixtures("cpu_kernels_restored")

CALLS = 200          # repeated calls per case: late entries and closed jobs both happen
THREADS = (16, 3, 2, 1)


def _ffn_case(fmt):
    """An FFN read densely enough to use the pool at 2 threads (> 256 KiB): q4_0 d = 1024 (3 x
    576 B a row) or f16 d = 512 (3 x 1 KiB a row), 1024 / 512 neurons, a third of them given."""
    d, n = (1024, 1024) if fmt == "q4_0" else (512, 512)
    ffn = make_ffn(fmt, d, n, seed=31)
    ids = id_set("random", n, 32)
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(33))
    return ffn, x, ids


def _attn_case():
    """attend_one on the pool: 8 KV heads x 64 x 300 positions (1.2 MB of K and V)."""
    H, KV, hd, pos, lo = 16, 8, 64, 299, 0
    g = torch.Generator().manual_seed(34)
    cap = pos + 1
    q, k, v = (torch.randn(n * hd, generator=g) for n in (H, KV, KV))
    kc, vc = torch.randn(KV, cap, hd, generator=g), torch.randn(KV, cap, hd, generator=g)
    ang = torch.rand(hd // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat([ang, ang]).cos().float(), torch.cat([ang, ang]).sin().float()
    ref = attend64(q, k, v, kc, vc, pos, cos, sin, lo)[0]
    return (q, k, v, kc, vc, pos, cos, sin, lo), ref


def _check_all_ops(threads, calls):
    """Every pool user, `calls` times each on a pool of `threads`."""
    cpu.set_num_threads(threads)
    assert cpu.get_num_threads() == threads
    for fmt in ("q4_0", "f16"):
        ffn, x, ids = _ffn_case(fmt)
        ref, bound = reference(ffn, x, ids, "drelu")
        a = torch.relu(torch.randn(2, ids.numel(), generator=torch.Generator().manual_seed(35)))
        dref, dbound = reference_down(ffn, a, ids)
        for i in range(calls):
            # one token (the fused gate+up path for q4_0) and two tokens, alternately; token 0
            # of the 2-token reference: exact=False passes every id, so its bound holds
            b = 1 + i % 2
            assert_within(cpu.ffn_sparse(ffn, x[:b], ids), ref[:b], bound[:b],
                          f"ffn_sparse {fmt} b={b} threads={threads} call {i}")
            if fmt == "q4_0" and i % 4 == 0:
                assert_within(cpu.down_sparse(ffn, a, ids), dref, dbound,
                              f"down_sparse threads={threads} call {i}")
    # two experts in one call, per-expert scales
    ffns = [make_ffn("q4_0", 1024, 1024, seed=s) for s in (31, 36)]
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(37))
    ids = [id_set("random", 1024, s)[:200] for s in (38, 39)]
    ref = torch.zeros(1, 1024, dtype=torch.float64)
    bound = torch.zeros(1, 1024, dtype=torch.float64)
    for f, i, sc in zip(ffns, ids, (0.6, 0.4)):
        r, bd = reference(f, x, i, "drelu", scale=torch.tensor([sc], dtype=torch.float64))
        ref, bound = ref + r, bound + bd
    for i in range(calls):
        assert_within(cpu.ffn_sparse_multi(ffns, x, ids, [[0.6], [0.4]], "drelu"), ref, bound,
                      f"ffn_sparse_multi threads={threads} call {i}")
    # linear: each row is computed by one thread whichever it is -> bit-identical every call
    g = torch.Generator().manual_seed(40)
    m = cpu.PackedLinear.from_weight(torch.randn(1024 + 3, 1024, generator=g) * 0.03, "q4_0")
    xl = torch.randn(1, 1024, generator=g)
    lref, lbound = linear_reference(m, xl)
    first = cpu.linear(xl, m)
    assert_within(first, lref, lbound, f"linear threads={threads}")
    for i in range(calls):
        assert torch.equal(cpu.linear(xl, m), first), f"linear threads={threads} call {i}"
    # attend_one: each KV group is computed by one thread -> bit-identical every call
    args, aref = _attn_case()
    first = cpu.attend_one(*args)
    torch.testing.assert_close(first.double(), aref, rtol=1e-5, atol=1e-5)
    for i in range(calls // 4):
        assert torch.equal(cpu.attend_one(*args), first), f"attend_one threads={threads} call {i}"
    # read_sum: 5 pieces of 4 MiB claimed by whoever comes; part[] of absent threads stays 0
    buf = torch.arange(5_000_003, dtype=torch.float32) % 7
    want = float(buf.double().sum())
    for i in range(calls // 4):
        assert cpu.read_sum(buf) == pytest.approx(want, rel=1e-6), f"read_sum threads={threads} call {i}"


def reference_down(ffn, a, ids):
    """(y, bound) float64 of down_sparse: y = a @ W2t[ids] with a [b, k] given exactly."""
    W2t = quant.unpack(ffn.down_t[ids.long()], ffn.fmt, ffn.d_model).double()
    ad = a.double()
    y = ad @ W2t
    bound = TOL * (ad.abs() @ W2t.abs()) + 1e-30
    if ffn.fmt == "q4_0":
        bound = bound + q4_down_bound(ffn.down_t[ids.long()], ad.abs())
    return y, bound


@pytest.mark.parametrize("threads", THREADS)
def test_pool_users_exact_on_any_pool_size(threads):
    """16 and 3 threads on 2 cores (oversubscribed: workers often arrive after the caller has
    claimed everything and closed the job), 2 and 1 (no pool): every pool user within its
    float64 bound on every call."""
    _check_all_ops(threads, CALLS)


@pytest.mark.parametrize("threads", [2, 3])
def test_pool_users_exact_beside_a_busy_process(threads):
    """A busy-looping process takes a core (as a test suite or another program does): workers
    are preempted or wake a time slice late; results stay within the bounds."""
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\n"
                             "while time.time() - t < 120: pass"])
    try:
        _check_all_ops(threads, CALLS // 2)
    finally:
        busy.kill()
        busy.wait()


def test_resize_between_calls():
    """Pools made and destroyed between calls (the destructor's stop protocol with workers
    spinning, sleeping or just woken) keep giving one linear result per pool size (the chunking
    depends on it, so the pairs of rows through dot2 can differ between sizes)."""
    g = torch.Generator().manual_seed(41)
    m = cpu.PackedLinear.from_weight(torch.randn(2048, 512, generator=g) * 0.05, "q4_0")
    x = torch.randn(1, 512, generator=g)
    ref, bound = linear_reference(m, x)
    want = {}
    for i in range(60):
        t = (2, 16, 3, 1, 5)[i % 5]
        cpu.set_num_threads(t)
        for _ in range(i % 3):
            y = cpu.linear(x, m)
            want.setdefault(t, y)
            assert_within(y, ref, bound, f"resize step {i}")
            assert torch.equal(y, want[t]), f"resize step {i}"
