"""hybridinfer.kernels.cpu.linear (the dense linear over packed rows) against float64, on both
dispatch paths; and the model's one dispatch point for a linear layer (hybridinfer.linear).

Error model as tests/test_kernels_cpu.py: x is q8-quantised per 32-block for q8_0 / q4_0 weights
(x_effective); then each output is a dot whose f32 error is bounded by TOL * sum |w x|.
"""
import numpy as np
import pytest
import torch

from hybridinfer import quant
from hybridinfer.kernels import cpu
from hybridinfer.linear import linear as model_linear

from test_kernels_cpu import PATHS, TOL, assert_within, random_packed, use_path, x_effective


@pytest.fixture(autouse=True)
def _restore_dispatch():
    yield
    cpu.force_reference(False)
    cpu.set_num_threads(2)


def reference(m: cpu.PackedLinear, x: torch.Tensor):
    """(y, bound) float64 for x [b, in] f32."""
    W = quant.unpack(m.rows(), m.fmt, m.in_features).double()            # [out, in] (GGUF order)
    xe = torch.stack([x_effective(xt, m.fmt) for xt in x])              # [b, in]
    return xe @ W.T, TOL * (xe.abs() @ W.abs().T) + 1e-30


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("shape", [(64, 1), (96, 37), (256, 129), (70, 33), (288, 7), (736, 5)])
@pytest.mark.parametrize("b", [1, 3, 7])
def test_linear_matches_reference(path, fmt, shape, b):
    d, n = shape
    if fmt in ("q8_0", "q4_0") and d % 32:
        pytest.skip("block formats need d % 32 == 0")
    use_path(path)
    g = torch.Generator().manual_seed(d * 1000 + n * 10 + b)
    m = cpu.PackedLinear.from_weight(torch.randn(n, d, generator=g) * d ** -0.5, fmt)
    x = torch.randn(b, d, generator=g)
    y = cpu.linear(x, m)
    assert y.shape == (b, n) and y.dtype == torch.float32
    ref, bound = reference(m, x)
    assert_within(y, ref, bound, f"{fmt} {path} d={d} n={n} b={b}")
    y1 = cpu.linear(x[0].contiguous(), m)                        # 1-D in, 1-D out
    assert y1.shape == (n,)
    assert_within(y1, ref[0], bound[0], "1-D")


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "f16"])
def test_linear_big_rows_threads_and_paths_agree(fmt):
    """Mistral-7B's q projection shape (4096 x 4096) in random packed rows; 1, 2, 5 threads and
    both paths give the same result within the bound."""
    d, n = 4096, 4096 + 3                                        # a row count not a chunk multiple
    m = cpu.PackedLinear(fmt, d, n, random_packed(fmt, n, d, 4))
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(9))
    ref, bound = reference(m, x)
    for path in PATHS:
        use_path(path)
        for t in (1, 2, 5):
            cpu.set_num_threads(t)
            assert_within(cpu.linear(x, m), ref, bound, f"{fmt} {path} {t} threads")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt,grouped", [("q4_0", True), ("q4_0", False), ("q8_0", False)])
def test_linear_one_token_runs(path, fmt, grouped):
    """One token over many rows: `linear` hands each chunk of rows to the table's dot_rows (a run
    with one address-order prefetch stream, kernels.h DotRowsFn). 4096 + 3 rows (chunk tails,
    an odd last row), and a view of the last 5 rows (the stream's end is the view's end), at 1,
    2 and 5 threads, against float64 and against the batch path's per-row dots (token 0 of a
    batch of 2)."""
    use_path(path)
    d, n = 4096, 4096 + 3
    m = cpu.PackedLinear(fmt, d, n, random_packed(fmt, n, d, 11))
    if grouped:
        m = cpu.PackedLinear(fmt, d, n, quant.group_q4_0(m.weight), True)
    tail = cpu.PackedLinear(fmt, d, 5, m.weight[n - 5:], grouped)
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(12))
    ref, bound = reference(m, x)
    for t in (1, 2, 5):
        cpu.set_num_threads(t)
        y = cpu.linear(x[0].contiguous(), m)
        assert_within(y, ref[0], bound[0], f"{fmt} grouped={grouped} {path} {t} threads")
        assert_within(y, cpu.linear(x, m)[0].double(), bound[0], "run vs per-row dots")
        assert_within(cpu.linear(x[0].contiguous(), tail), ref[0, n - 5:], bound[0, n - 5:], "tail view")


def test_alloc_weights_huge_page_aligned():
    """alloc_weights: 8 MiB and more start on a 2 MiB boundary (whole huge pages) where the OS
    has MADV_HUGEPAGE; the rows are usable after the call's own references are gone."""
    import gc
    import mmap
    t = cpu.alloc_weights(4096 + 1, 2304)                        # 9.4 MB, not a 2 MiB multiple
    assert t.shape == (4097, 2304) and t.dtype == torch.uint8 and t.is_contiguous()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert t.data_ptr() % (2 << 20) == 0
    gc.collect()
    t.fill_(7)
    t[-1, -1] = 9
    assert int(t[0, 0]) == 7 and int(t[-1, -1]) == 9
    small = cpu.alloc_weights(4, 64)                             # below 8 MiB: plain memory
    assert small.shape == (4, 64)


def test_q4_0_grouping_is_a_row_permutation():
    """quant.group_q4_0 (csrc/kernels.h Q4_0G) against a per-byte re-implementation: group g of 8
    blocks = their 8 scales, then for v < 4, k < 8 nibble bytes 4v..4v+3 of block k; tail blocks
    (nb % 8) unchanged; ungroup_q4_0 inverts it."""
    g = torch.Generator().manual_seed(21)
    for nb in (1, 7, 8, 9, 16, 23):
        p = torch.randint(0, 256, (3, nb * 18), dtype=torch.uint8, generator=g)
        want = p.clone()
        for r in range(3):
            for grp in range(nb // 8):
                src, dst = p[r, grp * 144:(grp + 1) * 144], want[r, grp * 144:(grp + 1) * 144]
                for k in range(8):
                    dst[2 * k:2 * k + 2] = src[18 * k:18 * k + 2]
                    for v in range(4):
                        dst[16 + 32 * v + 4 * k:16 + 32 * v + 4 * k + 4] = src[18 * k + 2 + 4 * v:18 * k + 6 + 4 * v]
        got = quant.group_q4_0(p)
        assert torch.equal(got, want), nb
        assert torch.equal(quant.ungroup_q4_0(got), p), nb


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d", [32, 256, 288, 512 + 7 * 32, 4096])
def test_grouped_q4_0_rows_odd_shapes_threads(path, d):
    """q4_0 PackedLinear rows are grouped (from_weight); the grouped kernel against float64 and
    against the same weights as plain GGUF rows: 1-7, 9 and 67 rows (odd pairs for dot2, chunk
    tails), 1-5 tokens, groups with and without GGUF tail blocks, 1 and 2 threads."""
    use_path(path)
    g = torch.Generator().manual_seed(d)
    for n in (1, 2, 3, 4, 5, 6, 7, 9, 67):
        w = torch.randn(n, d, generator=g) * d ** -0.5
        m = cpu.PackedLinear.from_weight(w, "q4_0")
        plain = cpu.PackedLinear.from_weight(w, "q4_0", grouped=False)
        assert m.grouped and not plain.grouped and torch.equal(m.rows(), plain.weight)
        assert (d < 256) == torch.equal(m.weight, plain.weight)  # no full group: nothing moves
        for b in (1, 2, 5):
            x = torch.randn(b, d, generator=g)
            ref, bound = reference(plain, x)
            for t in (1, 2):
                cpu.set_num_threads(t)
                y = cpu.linear(x, m)
                assert_within(y, ref, bound, f"grouped {path} d={d} n={n} b={b} t={t}")
                assert_within(y, cpu.linear(x, plain).double(), bound, f"grouped vs plain n={n} b={b}")


def test_grouped_rows_checks():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="q4_0 only"):
        cpu.PackedLinear("q8_0", 64, 8, quant.pack(w, "q8_0"), True)
    whole, views = cpu.stacked_linears([(lambda: w, 8), (lambda: w[:3], 3)], 64, "q4_0")
    assert whole.grouped and all(v.grouped for v in views)
    x = torch.randn(64)
    ref = cpu.linear(x, cpu.PackedLinear.from_weight(w, "q4_0"))
    torch.testing.assert_close(cpu.linear(x, whole), torch.cat([ref, ref[:3]]))
    torch.testing.assert_close(cpu.linear(x, views[1]), ref[:3])


def test_one_row_changed_is_caught():
    """The bound is tight enough to see one wrong row (the test can fail)."""
    d, n = 128, 17
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, d, generator=g)
    m = cpu.PackedLinear.from_weight(w, "q4_0")
    x = torch.randn(1, d, generator=g)
    ref, bound = reference(m, x)
    w2 = w.clone()
    w2[5] = torch.randn(d, generator=g)
    with pytest.raises(AssertionError):
        assert_within(cpu.linear(x, cpu.PackedLinear.from_weight(w2, "q4_0")), ref, bound)


def test_numpy_in_numpy_out():
    m = cpu.PackedLinear.from_weight(torch.randn(5, 64), "f32")
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    y = cpu.linear(x, m)
    assert isinstance(y, np.ndarray) and y.shape == (5,)
    np.testing.assert_allclose(y, quant.unpack(m.weight, "f32", 64).numpy() @ x, rtol=1e-5, atol=1e-5)


def test_errors_are_clear_value_errors():
    m = cpu.PackedLinear.from_weight(torch.randn(8, 64), "q4_0")
    with pytest.raises(ValueError, match="float32"):
        cpu.linear(torch.randn(64, dtype=torch.float64), m)
    with pytest.raises(ValueError, match=r"shape \[64\]"):
        cpu.linear(torch.randn(63), m)
    with pytest.raises(ValueError, match="contiguous"):
        cpu.linear(torch.randn(64, 2).t(), m)
    with pytest.raises(ValueError, match="PackedLinear"):
        cpu.linear(torch.randn(64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="PackedLinear.weight"):
        cpu.PackedLinear("q4_0", 64, 8, torch.zeros(8, 35, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown weight format"):
        cpu.PackedLinear("q5_k", 64, 8, torch.zeros(8, 36, dtype=torch.uint8))
    with pytest.raises(ValueError, match="divisible by 32"):
        cpu.PackedLinear.from_weight(torch.randn(8, 40), "q4_0")


@pytest.mark.parametrize("fmt", ["f32", "q8_0"])
def test_model_linear_dispatch(fmt):
    """hybridinfer.linear.linear: a torch weight goes through F.linear, a PackedLinear through the kernel;
    [b, t, in] inputs, bias, and the input dtype kept."""
    g = torch.Generator().manual_seed(11)
    w, bias = torch.randn(48, 64, generator=g) * 0.125, torch.randn(48, generator=g)
    x = torch.randn(2, 3, 64, generator=g)
    want = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    m = cpu.PackedLinear.from_weight(w, fmt)
    y = model_linear(x, m, bias)
    assert y.shape == (2, 3, 48) and y.dtype == torch.float32
    tol = 1e-5 if fmt == "f32" else 0.05
    assert float((y.double() - want).abs().max()) < tol * float(want.abs().max())
    assert torch.equal(model_linear(x, w, bias), torch.nn.functional.linear(x, w, bias))
    yb = model_linear(x.to(torch.bfloat16), m)
    assert yb.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["BambooForCausalLM", "TurboSparseMixtralForCausalLM"])
def test_cpu_model_with_packed_linears_graph_decoder_equals_plain(tmp_path, arch):
    """A hybrid build on the cpu device with a block format packs attention and lm_head
    (PackedLinear); the graph decoder's segments (uncaptured) take the same dispatch and give
    the plain decode path's logits."""
    from hybridinfer.config import ModelConfig
    from hybridinfer.generate import decode_one_token, prefill
    from hybridinfer.graphs import GraphDecoder
    from test_hybrid import hybrid, placements
    from tiny import random_ids, write_model

    folder, _, _ = write_model(tmp_path / "m", arch, seed=61)
    hot = placements(ModelConfig.from_dir(folder), seed=62)["all_cpu"]
    llm = hybrid(folder, hot, sparsity="exact", cpu_fmt="q8_0")
    m = llm.model
    assert isinstance(m.lm_head, cpu.PackedLinear) and m.lm_head.fmt == "q8_0"
    assert all(isinstance(getattr(b.attn, n), cpu.PackedLinear) for b in m.blocks for n in "qkvo")
    ids = random_ids(10, seed=63)
    ref_cache, gd = m.new_cache(16), GraphDecoder(m, 16)
    with torch.inference_mode():
        ref = [prefill(m, ids[:3], ref_cache)] + [decode_one_token(m, t, ref_cache) for t in ids[3:]]
        gd.cache.length = 0
        out = [prefill(m, ids[:3], gd.cache)] + [gd.step(t).clone() for t in ids[3:]]
    ref, out = torch.stack(ref), torch.stack(out)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4
