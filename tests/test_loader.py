"""Load options -> runtime: default sparsity, plan caching, and the bytes the build puts on the
GPU side held against what the plan budgeted."""
from __future__ import annotations

import pytest
import torch

import hybridinfer
from hybridinfer.build import RuntimeOptions, build_from_placement
from hybridinfer.checkpoint import Checkpoint
from hybridinfer.config import ModelConfig
from hybridinfer.errors import HybridInferError
from hybridinfer.ffn import HybridFFN
from hybridinfer.llm import LLM
from hybridinfer.predictor import budget_predictor_numel
from hybridinfer.kernels.gpu import DeviceLinear
from hybridinfer.placement import gpu_component_bytes, plan
from tiny import random_ids, write_model


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDINFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _ffns(llm):
    for blk in llm.model.blocks:
        yield from (blk.ffn.experts if hasattr(blk.ffn, "experts") else [blk.ffn])


def test_default_sparsity_follows_the_checkpoint(tmp_path, home):
    ts, _, _ = write_model(tmp_path / "ts", "TurboSparseMixtralForCausalLM")
    ll, _, _ = write_model(tmp_path / "ll", "LlamaForCausalLM", hidden_act="relu")
    assert {f.sparsity for f in _ffns(hybridinfer.load(ts, device="cpu"))} == {"predictor"}
    assert {f.sparsity for f in _ffns(hybridinfer.load(ll, device="cpu"))} == {"exact"}
    assert all(isinstance(f, HybridFFN) and f.hot is None for f in _ffns(hybridinfer.load(ll, device="cpu")))
    with pytest.raises(HybridInferError, match="no predictor"):
        hybridinfer.load(ll, device="cpu", sparsity="predictor")


@pytest.mark.parametrize("budget,fmt", [(300_000, "bf16"), (900_000, "bf16"), (3_000_000, "bf16"),
                                        (300_000, "q4_0"), (900_000, "q4_0")])
def test_build_puts_on_the_gpu_side_exactly_what_the_plan_budgets(tmp_path, budget, fmt):
    """q4_0 hot rows: attention and lm_head are q4_0 on the GPU side too (DeviceLinear)."""
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM", seed=3,
                               hidden_size=128, intermediate_size=256)
    cfg, ck = ModelConfig.from_dir(folder), Checkpoint(folder)
    p = plan(cfg, None, budget, context=64, fmt=fmt, predictor_numel=budget_predictor_numel(cfg, ck),
             min_active_bytes=0)
    model = build_from_placement(cfg, ck, torch.device("cpu"), torch.bfloat16, p,
                                 RuntimeOptions(sparsity="predictor", gpu_fmt=fmt))
    packed = isinstance(model.blocks[0].attn.q, DeviceLinear)
    assert packed == (fmt == "q4_0" and p.attention_on_gpu)
    want = gpu_component_bytes(cfg, p)
    got = model.device_bytes
    for comp, b in want.items():
        if comp != "kv_cache":                     # allocated per generation, for p.context positions
            assert got.get(comp, 0) == b, (comp, got, want)
    kv = model.new_cache(p.context).k[0]
    kv_bytes = 2 * cfg.num_layers * kv.numel() * kv.element_size() if p.kv_on_gpu else 0
    assert kv_bytes == want["kv_cache"]
    assert sum(got.values()) + kv_bytes == p.gpu_bytes <= budget
    if budget >= 900_000:
        assert p.hot_count() > 0


def test_plans_are_cached_on_disk(tmp_path, home):
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM", seed=4)
    a = hybridinfer.load(folder, device="cpu", vram_budget="1MiB", sparsity="exact")
    plans = list((home / "plans").glob("*.json"))
    assert len(plans) == 1
    b = hybridinfer.load(folder, device="cpu", vram_budget="1MiB", sparsity="exact")
    assert list((home / "plans").glob("*.json")) == plans
    assert a.model.placement.to_json() == b.model.placement.to_json()
    hybridinfer.load(folder, device="cpu", vram_budget="2MiB", sparsity="exact")
    assert len(list((home / "plans").glob("*.json"))) == 2
    ids = random_ids(6)
    ref = hybridinfer.load(folder, device="cpu", sparsity="dense").logits(ids)
    assert float((a.logits(ids) - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_bad_budgets(tmp_path, home):
    folder, _, _ = write_model(tmp_path / "m", "LlamaForCausalLM")
    for bad, msg in [("abc", "bad VRAM budget"), ("-5GiB", "negative"), ("auto", "needs a visible GPU")]:
        with pytest.raises(HybridInferError, match=msg):
            hybridinfer.load(folder, device="cpu", vram_budget=bad)


@pytest.mark.parametrize("arch,extra,sparsity,split",
                         [("TurboSparseMixtralForCausalLM", {}, "predictor", "1MiB"),
                          ("LlamaForCausalLM", {"hidden_act": "relu"}, "exact", "400KiB")])
def test_a_profile_orders_the_cold_rows_and_changes_no_output(tmp_path, home, arch, extra, sparsity, split):
    """The loader hands the plan's profile to the build: each FFN's cold rows after the warm ones
    go in descending firing counts (ties by id). The same placement built without it (rows by
    id) gives the same logits, whole-sequence and token by token (the CPU decode's ColdStep maps
    the permuted rows), within float32 rounding."""
    from hybridinfer.profile import SCHEMA_VERSION, NeuronProfile, ffn_keys, model_identity
    from test_hybrid import decode_logits

    folder, _, _ = write_model(tmp_path / "m", arch, seed=21, **extra)
    cfg = ModelConfig.from_dir(folder)
    g = torch.Generator().manual_seed(22)
    cols = cfg.num_experts if cfg.is_moe else 1
    reached = torch.full((cfg.num_layers, cols), 100, dtype=torch.int64)
    counts = {k: torch.randint(0, 8, (cfg.intermediate_size,), generator=g) for k in ffn_keys(cfg)}
    prof = NeuronProfile(SCHEMA_VERSION, model_identity(cfg), "test", 100 * cols, counts, reached)
    prof.save(folder / "profile.safetensors")
    ids = random_ids(8, seed=23)
    for budget in (None, split):                         # all rows cold; a split with hot rows
        llm = hybridinfer.load(folder, device="cpu", vram_budget=budget, sparsity=sparsity,
                               dtype=torch.float32)
        p = llm.model.placement
        assert p.hot_count() > 0 or budget is None
        permuted = 0
        for layer, blk in enumerate(llm.model.blocks):
            ffns = blk.ffn.experts if cfg.is_moe else [blk.ffn]
            for e, f in enumerate(ffns):
                c = counts[(layer, e if cfg.is_moe else -1)]
                rest = f.cold_ids[f.n_warm:]
                key = list(zip((-c[rest]).tolist(), rest.tolist()))
                assert key == sorted(key)
                permuted += rest.tolist() != sorted(rest.tolist())
        assert permuted > 0                              # not the id order: the test sees a permutation
        thr = llm.model.predictor_threshold[0]
        by_id = build_from_placement(cfg, Checkpoint(folder), torch.device("cpu"), torch.float32, p,
                                     RuntimeOptions(sparsity=sparsity, predictor_threshold=thr))
        other = LLM(by_id, llm.tokenizer, folder)
        a, b = llm.logits(ids), other.logits(ids)
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5
        da, db = decode_logits(llm, ids), decode_logits(other, ids)
        assert float((da - db).abs().max() / db.abs().max()) < 1e-5
