"""The hybrid runtime on the CPU (the GPU side is the cpu device): every placement, every
sparsity mode, against the dense model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hybridinfer
from hybridinfer.build import RuntimeOptions, build_hybrid
from hybridinfer.checkpoint import Checkpoint
from hybridinfer.config import ModelConfig
from hybridinfer.errors import HybridInferError
from hybridinfer.ffn import HybridFFN, activate, gated_rows
from hybridinfer.generate import GenerationConfig, generate_tokens
from hybridinfer.llm import LLM
from hybridinfer.tokenizer import Tokenizer
from tiny import random_ids, write_model

# The GPU side: the cpu device everywhere (CI), and cuda where there is one (tests/gpu/README.md).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def hybrid(folder, hot, device=torch.device("cpu"), **opts) -> LLM:
    cfg = ModelConfig.from_dir(folder)
    net = build_hybrid(cfg, Checkpoint(folder), device, torch.float32, hot, RuntimeOptions(**opts))
    return LLM(net, Tokenizer(folder), folder)


def decode_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits at positions 2.. computed one token at a time (the batch-1 decode path)."""
    from hybridinfer.generate import decode_one_token, prefill
    cache = llm.model.new_cache(len(ids))
    with torch.inference_mode():
        out = [prefill(llm.model, ids[:3], cache)]
        out += [decode_one_token(llm.model, t, cache) for t in ids[3:]]
    return torch.stack(out).cpu()


def placements(cfg: ModelConfig, seed: int) -> dict[str, dict]:
    """all on the GPU side, all on the CPU, random splits, some FFNs with no GPU rows."""
    rng = np.random.default_rng(seed)
    n, experts = cfg.intermediate_size, (range(cfg.num_experts) if cfg.is_moe else [-1])
    keys = [(layer, e) for layer in range(cfg.num_layers) for e in experts]
    rand = {k: np.sort(rng.choice(n, rng.integers(1, n), replace=False)) for k in keys}
    mixed = {k: (np.arange(n) if i % 3 == 0 else rand[k]) for i, k in enumerate(keys) if i % 3 != 1}
    return {"all_gpu": {k: np.arange(n) for k in keys}, "all_cpu": {}, "random": rand, "mixed": mixed}


MODELS = [("TurboSparseMixtralForCausalLM", {}), ("BambooForCausalLM", {}),
          ("LlamaForCausalLM", {"hidden_act": "relu"}), ("SparseLlamaForCausalLM", {})]


@pytest.mark.parametrize("arch,extra", MODELS, ids=[m[0] for m in MODELS])
def test_exact_mode_equals_dense_for_every_placement(tmp_path, arch, extra, device):
    folder, _, _ = write_model(tmp_path / "m", arch, seed=31, **extra)
    dense = hybridinfer.load(folder, device="cpu", sparsity="dense")
    ids = random_ids(9, seed=32)
    ref = dense.logits(ids)
    prompt = ids[:4]
    g = GenerationConfig(max_new_tokens=8, temperature=0)
    ref_tokens = list(generate_tokens(dense.model, prompt, g))
    for name, hot in placements(dense.config, seed=33).items():
        llm = hybrid(folder, hot, device, sparsity="exact")
        err = float((llm.logits(ids) - ref).abs().max() / ref.abs().max())
        assert err <= 1e-4, (name, err)
        err = float((decode_logits(llm, ids) - ref[2:]).abs().max() / ref.abs().max())
        assert err <= 1e-4, (name, "decode", err)
        assert list(generate_tokens(llm.model, prompt, g)) == ref_tokens, name
        d = hybrid(folder, hot, device, sparsity="dense")
        assert float((d.logits(ids) - ref).abs().max() / ref.abs().max()) <= 1e-4, name
        b = hybrid(folder, hot, device, sparsity="exact", dense_above=4)   # 9-token batch: dense
        assert float((b.logits(ids) - ref).abs().max() / ref.abs().max()) <= 1e-4, name
        st = hybrid(folder, hot, device, sparsity="exact", stream_above=4)  # cold rows streamed
        assert float((st.logits(ids) - ref).abs().max() / ref.abs().max()) <= 1e-4, name


class Oracle(torch.nn.Module):
    """A predictor that knows the truth: active exactly where the activation is non-zero."""

    def __init__(self, w1, w3, act, thr):
        super().__init__()
        self.w1, self.w3, self.act, self.thr, self.threshold = w1, w3, act, thr, 0.0

    def active(self, x):
        return activate(x @ self.w1.T, x @ self.w3.T, self.act, self.thr) != 0


def _with_oracles(llm: LLM, folder, device) -> LLM:
    ck = Checkpoint(folder)
    from hybridinfer.checkpoint import ffn_names
    for layer, blk in enumerate(llm.model.blocks):
        ffns = list(blk.ffn.experts) if hasattr(blk.ffn, "experts") else [blk.ffn]
        for e, f in enumerate(ffns):
            assert isinstance(f, HybridFFN)
            n = ffn_names(llm.config.family, layer, e if len(ffns) > 1 else None)
            f.predictor = Oracle(ck.get(n["gate"]).float().to(device), ck.get(n["up"]).float().to(device),
                                 f.activation, f.threshold)
            f.sparsity = "predictor"
    return llm


@pytest.mark.parametrize("arch", ["TurboSparseMixtralForCausalLM", "BambooForCausalLM"])
def test_oracle_predictor_equals_exact(tmp_path, arch, device):
    folder, _, _ = write_model(tmp_path / "m", arch, seed=34)
    cfg = ModelConfig.from_dir(folder)
    hot = placements(cfg, seed=35)["mixed"]
    exact = hybrid(folder, hot, device, sparsity="exact")
    oracle = _with_oracles(hybrid(folder, hot, device, sparsity="exact"), folder, device)
    ids = random_ids(10, seed=36)
    ref = exact.logits(ids)
    assert float((oracle.logits(ids) - ref).abs().max() / ref.abs().max()) <= 1e-5
    dec = decode_logits(exact, ids)
    assert float((decode_logits(oracle, ids) - dec).abs().max() / ref.abs().max()) <= 1e-5
    prompt, g = ids[:3], GenerationConfig(max_new_tokens=8, temperature=0)
    assert list(generate_tokens(oracle.model, prompt, g)) == list(generate_tokens(exact.model, prompt, g))


def test_shipped_predictors_skip_neurons_and_stay_close(tmp_path):
    """Predictor mode runs the checkpoint's predictors: it computes fewer neurons than exact."""
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM", seed=37)
    cfg = ModelConfig.from_dir(folder)
    hot = placements(cfg, seed=38)["random"]
    llm = hybrid(folder, hot, sparsity="predictor")
    ids = random_ids(6, seed=39)
    out = llm.logits(ids)
    assert torch.isfinite(out).all()
    f = llm.model.blocks[0].ffn.experts[0]
    x = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    m = f.predict(x)
    assert m is not None and 0 < int(m.sum()) < cfg.intermediate_size
    assert len(f.cold_rows(m)) == int(m[f.cold_ids].sum())


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "bf16"])
def test_quantised_rows_match_dense_on_the_same_rounded_weights(tmp_path, fmt, device):
    from hybridinfer import quant
    from hybridinfer.checkpoint import save_checkpoint
    from hybridinfer.footprint import linear_fmt
    folder, cfg_d, tensors = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM", seed=40)
    rounded = {k: (quant.unpack(quant.pack(v, fmt), fmt, v.shape[1]) if ".experts." in k and "predictor" not in k
                   and not k.endswith("w2.weight") else v) for k, v in tensors.items()}
    for k, v in tensors.items():  # w2 is packed transposed (neuron-major)
        if k.endswith("w2.weight"):
            rounded[k] = quant.unpack(quant.pack(v.t(), fmt), fmt, v.shape[0]).t().contiguous()
        # with a block format the CPU's attention projections and lm_head are packed in it too,
        # and a GPU side with q4_0 rows keeps them in q4_0 (footprint.linear_fmt)
        if (device.type == "cpu" and fmt in ("q8_0", "q4_0") or linear_fmt(fmt)) and (
                "_proj.weight" in k and ".self_attn." in k or k == "lm_head.weight"):
            rounded[k] = quant.unpack(quant.pack(v, fmt), fmt, v.shape[1])
    ref_dir = save_checkpoint(tmp_path / "r", cfg_d, rounded, extra_files={
        n: (folder / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json")})
    ref = hybridinfer.load(ref_dir, device="cpu", sparsity="dense")
    cfg = ModelConfig.from_dir(folder)
    llm = hybrid(folder, placements(cfg, seed=41)["mixed"], device, sparsity="exact", cpu_fmt=fmt, gpu_fmt=fmt)
    ids = random_ids(8, seed=42)
    want = ref.logits(ids)
    # the CPU kernels quantise x to q8_0 for block formats: a small, bounded difference
    tol = 2e-2 if fmt in ("q8_0", "q4_0") else 1e-4
    assert float((llm.logits(ids) - want).abs().max() / want.abs().max()) <= tol
    assert float((decode_logits(llm, ids) - want[2:]).abs().max() / want.abs().max()) <= tol


def test_bad_placements_and_options(tmp_path):
    folder, _, _ = write_model(tmp_path / "m", "LlamaForCausalLM", seed=43, hidden_act="relu")
    with pytest.raises(HybridInferError, match="sorted, unique"):
        hybrid(folder, {(0, -1): np.array([5, 3])})
    with pytest.raises(HybridInferError, match="in 0..127"):
        hybrid(folder, {(0, -1): np.array([1, 128])})
    with pytest.raises(HybridInferError, match="no predictor"):
        hybrid(folder, {}, sparsity="predictor")
    with pytest.raises(HybridInferError, match="bad sparsity"):
        hybrid(folder, {}, sparsity="fast")


def test_cpu_predictors_are_packed_q8_0_with_a_quantised_cpu_format(tmp_path):
    """Predictors on the CPU with a quantised --weights format: q8_0 rows for the C++ kernels
    (torch's float matmul is slow on AVX2 CPUs), fc2 stored transposed (fc2t [rank, n_ff]: the
    rows relu zeroes are skipped; one token is relu_mlp_t, a batch rows_axpy); scores agree
    with the float predictor up to the rounding of q8_0 weights and the q8-quantised input."""
    from hybridinfer.kernels.cpu import PackedLinear
    from hybridinfer.predictor import Predictor
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM", seed=41)
    cfg = ModelConfig.from_dir(folder)
    hot = placements(cfg, seed=42)["random"]
    packed = hybrid(folder, hot, sparsity="predictor", cpu_fmt="q8_0")
    plain = hybrid(folder, hot, sparsity="predictor")
    g = torch.Generator().manual_seed(43)
    for layer in range(cfg.num_layers):
        for e in range(cfg.num_experts):
            p = packed.model.blocks[layer].ffn.experts[e].predictor
            f = plain.model.blocks[layer].ffn.experts[e].predictor
            assert isinstance(p.fc1, PackedLinear) and p.fc2 is None
            assert isinstance(p.fc2t, PackedLinear) and p.fc2t.fmt == "q8_0" and not p.fc2t.grouped
            assert (p.fc2t.out_features, p.fc2t.in_features) == tuple(f.fc2.shape[::-1])
            for n in (3, 1):                                   # a batch, and one token
                x = torch.randn(n, cfg.hidden_size, generator=g)
                ref = Predictor(f.fc1.double(), f.fc2.double())(x.double())
                got = p(p.input(x)).double()
                assert got.shape == ref.shape
                assert float((got - ref).abs().max() / ref.abs().max()) <= 3e-2
                far = (ref.abs() > 0.1 * ref.abs().max())      # clear of the threshold: same mask
                assert torch.equal((got > 0)[far], (ref > 0)[far])
    ids = random_ids(6, seed=44)
    assert torch.isfinite(packed.logits(ids)).all()
    assert decode_logits(packed, ids).isfinite().all()


def random_tiers(seed: int, cases: int = 20):
    """(n, hot ids, warm ids): disjoint sorted random subsets of 0..n-1, n in 1..299."""
    rng = np.random.default_rng(seed)
    for _ in range(cases):
        n = int(rng.integers(1, 300))
        perm = rng.permutation(n)
        a, b = sorted(rng.integers(0, n + 1, 2))
        yield n, np.sort(perm[:a]), np.sort(perm[a:b])


def test_split_rows_orders_warm_first_and_validates():
    from hybridinfer.build import split_rows

    for n, hot, warm in random_tiers(7):
        h, cold, n_warm = split_rows(n, hot.astype(np.int32), warm.astype(np.int32))
        rest = np.setdiff1d(np.arange(n), np.concatenate([hot, warm]))
        assert h.dtype == cold.dtype == np.int64 and np.array_equal(h, hot)
        assert n_warm == len(warm) and np.array_equal(cold, np.concatenate([warm, rest]))
        assert np.array_equal(np.sort(np.concatenate([h, cold])), np.arange(n))   # a partition
    h, cold, n_warm = split_rows(5, [], [])
    assert h.size == 0 and np.array_equal(cold, np.arange(5)) and n_warm == 0
    for hot, warm, msg in [([1, 2], [2, 3], "overlap"), ([], [3, 1], "warm ids.*sorted, unique"),
                           ([], [1, 1], "warm ids"), ([], [4, 9], "warm ids.*in 0..7"), ([-1], [], "hot ids"),
                           ([0, 8], [], "hot ids.*in 0..7")]:
        with pytest.raises(HybridInferError, match=msg):
            split_rows(8, hot, warm)


def test_split_rows_orders_the_cold_rest_by_frequency():
    """With firing frequencies the cold rows after the warm ones go in descending frequency, ties
    by id; the hot and warm ids are as without; a frequency vector of the wrong size is refused."""
    from hybridinfer.build import split_rows

    rng = np.random.default_rng(9)
    for n, hot, warm in random_tiers(8):
        freq = rng.integers(0, 6, n)                     # many ties
        h, cold, n_warm = split_rows(n, hot, warm, freq=freq)
        h0, cold0, _ = split_rows(n, hot, warm)
        assert np.array_equal(h, h0) and n_warm == len(warm) and np.array_equal(cold[:n_warm], warm)
        rest = cold[n_warm:]
        assert np.array_equal(np.sort(rest), cold0[n_warm:])                 # the same rows
        key = [(-int(freq[i]), int(i)) for i in rest]
        assert key == sorted(key)                        # descending frequency, then by id
    with pytest.raises(HybridInferError, match="3 firing frequencies.*for 8 neurons"):
        split_rows(8, [], [], freq=[1, 2, 3])


@pytest.mark.parametrize("arch,extra", MODELS[:3], ids=[m[0] for m in MODELS[:3]])
def test_warm_rows_first_in_the_cold_rows_same_outputs(tmp_path, arch, extra):
    """A build with warm ids has the same cold rows, reordered warm-first, and the same outputs as
    the build without (on the cpu device every path computes the warm rows with the cold ones)."""
    folder, _, _ = write_model(tmp_path / "m", arch, seed=51, **extra)
    dense = hybridinfer.load(folder, device="cpu", sparsity="dense")
    ids = random_ids(9, seed=52)
    ref = dense.logits(ids)
    rng = np.random.default_rng(53)
    hot, warm = {}, {}
    n = dense.config.intermediate_size
    for k in placements(dense.config, seed=54)["random"]:
        perm = rng.permutation(n)
        a, b = sorted(rng.integers(0, n, 2))
        hot[k], warm[k] = np.sort(perm[:a]), np.sort(perm[a:b + 1])     # at least one warm row
    for fmt in ("auto", "q8_0"):
        plain = hybrid(folder, hot, sparsity="exact", cpu_fmt=fmt)
        cfg = ModelConfig.from_dir(folder)
        net = build_hybrid(cfg, Checkpoint(folder), torch.device("cpu"), torch.float32, hot,
                           RuntimeOptions(sparsity="exact", cpu_fmt=fmt), warm=warm)
        llm = LLM(net, Tokenizer(folder), folder)
        pairs = [(blk.ffn.experts if hasattr(blk.ffn, "experts") else [blk.ffn],
                  blk2.ffn.experts if hasattr(blk2.ffn, "experts") else [blk2.ffn])
                 for blk, blk2 in zip(llm.model.blocks, plain.model.blocks)]
        for layer, (fw, fp) in enumerate(pairs):
            for e, (a, b) in enumerate(zip(fw, fp)):
                k = (layer, e if cfg.is_moe else -1)
                assert a.n_warm == len(warm[k]) and b.n_warm == 0
                cold_w = a.cold_ids.numpy()
                assert np.array_equal(cold_w[:a.n_warm], warm[k])
                assert np.array_equal(cold_w[a.n_warm:], b.cold_ids.numpy()[~np.isin(b.cold_ids.numpy(), warm[k])])
                row_of = np.searchsorted(b.cold_ids.numpy(), cold_w)     # the plain build's row of each
                for t in ("gate", "up", "down_t"):
                    assert torch.equal(getattr(a.cold, t), getattr(b.cold, t)[torch.from_numpy(row_of)])
        tol = 1e-4 if fmt == "auto" else 1e-5      # q8_0: the same rounded rows, vs the plain build
        base = ref if fmt == "auto" else plain.logits(ids)
        err = float((llm.logits(ids) - base).abs().max() / base.abs().max())
        assert err <= tol, (fmt, err)
        base_dec = ref[2:] if fmt == "auto" else decode_logits(plain, ids)
        err = float((decode_logits(llm, ids) - base_dec).abs().max() / base_dec.abs().max())
        assert err <= tol, (fmt, "decode", err)


def test_load_with_pcie_share_builds_the_plans_warm_rows(tmp_path):
    """The loader's pcie_share reaches the plan and the build (cpu device: explicit share)."""
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM", seed=61)
    ids = random_ids(7, seed=62)
    kw = dict(device="cpu", sparsity="exact", vram_budget="250KB", context=64)   # some FFN rows hot
    a = hybridinfer.load(folder, **kw)                     # cpu device: default share 0
    b = hybridinfer.load(folder, pcie_share=0.6, **kw)
    assert a.model.placement.warm == {} and b.model.placement.warm_count() > 0
    assert 0 < b.model.placement.hot_count() < 8 * 128
    warm = b.model.placement.warm
    got = {(layer, e): f.n_warm for layer, blk in enumerate(b.model.blocks) for e, f in enumerate(blk.ffn.experts)}
    assert got == {k: len(warm.get(k, ())) for k in got}
    ref = a.logits(ids)
    assert float((b.logits(ids) - ref).abs().max() / ref.abs().max()) <= 1e-4
    # share 1 (and "auto" for FFNs this small: a CPU half's fixed cost outweighs their bytes):
    # every non-hot row warm, also those the profile never saw fire, so no FFN keeps a CPU half
    for share in (1.0, "auto"):
        c = hybridinfer.load(folder, pcie_share=share, **kw)
        ffns = [f for blk in c.model.blocks for f in blk.ffn.experts if f.cold is not None]
        assert ffns and all(f.n_warm == f.cold.n_ff for f in ffns), share
        assert float((c.logits(ids) - ref).abs().max() / ref.abs().max()) <= 1e-4
    with pytest.raises(HybridInferError, match="pcie share"):
        hybridinfer.load(folder, pcie_share=1.5, **kw)


class _FixedMask(torch.nn.Module):
    """A predictor whose answer is a fixed random neuron set (threshold 0)."""

    def __init__(self, mask):
        super().__init__()
        self.mask, self.threshold = mask, 0.0

    def active(self, x):
        return self.mask.expand(x.shape[0], -1)


@pytest.mark.parametrize("fmt,hot_fmt", [("f32", "f32"), ("q4_0", "q4_0"), ("q4_0", "q8_0"), ("q4_0", "f32")])
@pytest.mark.parametrize("masked", [False, True])
def test_device_batch_equals_float64_reference(fmt, hot_fmt, masked, device):
    """A streamed batch (prefill) dequantises the hot rows and the copied cold rows into one
    matrix set, hot first: the result must be the FFN over every row (or the predicted rows),
    whatever the hot ids' order, and whatever the hot rows' format beside the cold rows'."""
    from hybridinfer import quant
    from hybridinfer.kernels.cpu import PackedFFN
    from hybridinfer.kernels.gpu import HotFFN
    g = torch.Generator().manual_seed(61)
    d, n_ff, n = 64, 96, 7
    w1, w3 = torch.randn(n_ff, d, generator=g), torch.randn(n_ff, d, generator=g)
    w2 = torch.randn(d, n_ff, generator=g) / 8
    hot_ids = torch.randperm(n_ff, generator=g)[:37]
    cold_ids = torch.from_numpy(np.setdiff1d(np.arange(n_ff), hot_ids.numpy()))
    mask = torch.rand(n_ff, generator=g) < 0.4

    def rounded(w, f, rows):  # the weights as the format stores them (rows: which neurons)
        if f == "f32":
            return w
        w = w.clone()
        w[rows] = quant.unpack(quant.pack(w[rows], f), f, w.shape[1])
        return w
    # the reference reads the same rounded weights: hot rows in hot_fmt, cold rows in fmt
    w1, w3 = (rounded(rounded(w, hot_fmt, hot_ids), fmt, cold_ids) for w in (w1, w3))
    w2 = rounded(rounded(w2.t().contiguous(), hot_fmt, hot_ids), fmt, cold_ids).t()
    hot = HotFFN.build(w1, w3, w2, hot_ids, hot_fmt, device)
    cold = PackedFFN.from_weights(w1[cold_ids], w3[cold_ids], w2[:, cold_ids], fmt)
    ffn = HybridFFN(n_ff, hot, cold, cold_ids, "drelu", 0.0, "predictor" if masked else "exact",
                    _FixedMask(mask.to(device)) if masked else None, device, stream_above=0)
    x = torch.randn(n, d, generator=g)
    y = ffn(x.to(device)).cpu().double()
    a = activate(x.double() @ w1.double().T, x.double() @ w3.double().T, "drelu")
    if masked:
        a = a * mask.double()
    ref = a @ w2.double().T
    assert float((y - ref).abs().max() / ref.abs().max()) <= 1e-5


@pytest.mark.parametrize("kind", ["drelu", "relu", "fatrelu", "silu"])
def test_gated_rows_equal_float64(kind):
    """The batch FFN over float rows [3, n, d] (gate and up in one matmul, dReLU's relu once over
    both) gives the float64 reference, with and without a row mask."""
    g = torch.Generator().manual_seed(71)
    m, n, d = 5, 48, 32
    w = torch.randn(3, n, d, generator=g)
    x = torch.randn(m, d, generator=g)
    keep = torch.rand(n, generator=g) < 0.5
    thr = 0.3
    for mask in (None, keep):
        a = activate(x.double() @ w[0].double().T, x.double() @ w[1].double().T, kind, thr)
        ref = (a if mask is None else a * mask.double()) @ w[2].double()
        y = gated_rows(x, w, kind, thr, mask).double()
        assert y.shape == (m, d)
        assert float((y - ref).abs().max() / ref.abs().max()) <= 1e-5, kind


def test_stacked3_only_for_consecutive_thirds_of_one_storage():
    """One copy may move gate, up and down_t only when they are consecutive equal thirds of one
    allocation; separate tensors, gaps, other orders and row slices must say no."""
    from hybridinfer import quant
    from hybridinfer.kernels.cpu import PackedFFN
    base = torch.arange(3 * 5 * 18, dtype=torch.int64).to(torch.uint8).view(3, 5, 18)
    st = quant.stacked3(*base.unbind(0))
    assert st is not None and st.shape == (3, 5, 18) and torch.equal(st, base)
    assert quant.stacked3(base[1], base[0], base[2]) is None            # out of order
    assert quant.stacked3(base[0], base[1], base[1]) is None
    assert quant.stacked3(*(t.clone() for t in base.unbind(0))) is None  # separate allocations
    assert quant.stacked3(*(t[:4] for t in base.unbind(0))) is None     # row slices: gaps
    big = torch.zeros(16, 18, dtype=torch.uint8)
    assert quant.stacked3(big[0:5], big[5:10], big[10:15]) is not None  # a flat buffer cut in thirds
    assert quant.stacked3(big[0:5], big[5:10], big[11:16]) is None
    g = torch.Generator().manual_seed(72)
    w1, w3, w2 = torch.randn(7, 64, generator=g), torch.randn(7, 64, generator=g), torch.randn(64, 7, generator=g)
    p = PackedFFN.from_weights(w1, w3, w2, "q4_0")
    assert p.stacked() is not None and torch.equal(p.stacked()[2], p.down_t)
    assert p.rows(1, 5).stacked() is None
    ids = torch.tensor([4, 0, 6, 2])
    q = p.take(ids)                                     # a gather into one allocation again
    assert q.n_ff == 4 and q.stacked() is not None
    for a, b in ((q.gate, p.gate), (q.up, p.up), (q.down_t, p.down_t)):
        assert torch.equal(a, b[ids])
