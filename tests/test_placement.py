"""The placement solver: budgets hold exactly, hottest neurons first, MILP == greedy on small cases,
the sync constraint, files, and clear errors for bad input."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from hybridinfer.cli import main
from hybridinfer.config import ModelConfig
from hybridinfer.errors import HybridInferError
from hybridinfer.footprint import ffn_rows_bytes
from hybridinfer.budget import parse_budget
from hybridinfer.placement import MIN_ACTIVE_BYTES, Placement, fixed_bytes, gpu_component_bytes, plan, summary
from hybridinfer.profile import SCHEMA_VERSION, NeuronProfile, ffn_keys, model_identity
from hybridinfer.synth import config_dict
from tiny import write_model

GiB, MiB, KiB = 2**30, 2**20, 2**10


def tiny_cfg(arch="TurboSparseMixtralForCausalLM", **kw) -> ModelConfig:
    return ModelConfig.from_dict(config_dict(arch, **kw))


def random_profile(cfg: ModelConfig, seed=0, tokens=1000, skewed=False) -> NeuronProfile:
    """Random firing counts; skewed: Zipf-like (a few neurons fire on most tokens), shuffled over the ids."""
    g = torch.Generator().manual_seed(seed)
    cols = cfg.num_experts if cfg.is_moe else 1
    reached = torch.randint(tokens // 4, tokens, (cfg.num_layers, cols), generator=g)
    counts = {}
    for layer, e in ffn_keys(cfg):
        n = int(reached[layer, max(e, 0)])
        if skewed:
            f = 1.0 / torch.arange(1, cfg.intermediate_size + 1, dtype=torch.float64) ** 1.2
            f = f[torch.randperm(cfg.intermediate_size, generator=g)]
        else:
            f = torch.rand(cfg.intermediate_size, generator=g) ** 3
        counts[(layer, e)] = (f * n).long()
    return NeuronProfile(SCHEMA_VERSION, model_identity(cfg), "synthetic", tokens, counts, reached)


def core_bytes(cfg, context):
    f = fixed_bytes(cfg, context)
    return f["attention"] + f["norms"] + f["router"] + f["kv_cache"]


def value(cfg, prof, p: Placement) -> float:
    """Expected FFN neuron reads per token served from the GPU (the FFN part of the objective)."""
    return sum(float(prof.token_frequency(*k)[torch.as_tensor(v, dtype=torch.long)].sum()) for k, v in p.hot.items())


def test_parse_budget():
    assert parse_budget("16GiB") == 16 * GiB
    assert parse_budget("16000MB") == 16_000_000_000
    assert parse_budget("300KiB") == 300 * KiB
    assert parse_budget("1.5 GB") == 1_500_000_000
    assert parse_budget("0") == 0 and parse_budget("0GiB") == 0
    assert parse_budget("123456") == 123456
    assert parse_budget("0.8", free_vram=10 * GiB) == int(8 * GiB)
    assert parse_budget("auto", free_vram=10 * GiB) == 10 * GiB - 512 * MiB
    assert parse_budget("auto", free_vram=100 * MiB) == 0
    for bad, msg in [("abc", "bad VRAM budget"), ("-1GiB", "negative"), ("12 parsecs", "bad VRAM budget"),
                     ("", "bad VRAM budget"), ("2.5", "needs a unit"), ("0.5", "no GPU"), ("auto", "needs a visible GPU")]:
        with pytest.raises(HybridInferError, match=msg):
            parse_budget(bad)
    with pytest.raises(HybridInferError, match="larger than the GPU"):
        parse_budget("48GiB", free_vram=20 * GiB, total_vram=24 * GiB)


@pytest.mark.parametrize("solver", ["milp", "greedy"])
@pytest.mark.parametrize("arch", ["TurboSparseMixtralForCausalLM", "LlamaForCausalLM"])
def test_budget_holds_exactly(arch, solver):
    cfg = tiny_cfg(arch, hidden_act="relu")
    prof = random_profile(cfg)
    core = core_bytes(cfg, 512)
    for budget in [0, core - 1, core, core + 5000, core + 40 * KiB, core + 200 * KiB, 10 * MiB]:
        p = plan(cfg, prof, budget, context=512, solver=solver, predictor_numel=3000, min_active_bytes=0)
        comp = gpu_component_bytes(cfg, p)
        assert p.gpu_bytes == sum(comp.values()) == sum(p.components.values()) <= budget
        assert p.attention_on_gpu == p.kv_on_gpu == (budget >= core)
        if budget < core:
            assert p.gpu_bytes == 0 and p.hot_count() == 0
        for v in p.hot.values():
            assert v.dtype == np.int32 and np.all(np.diff(v) > 0)
    full = plan(cfg, prof, 10 * MiB, context=512, solver=solver, predictor_numel=3000)
    assert full.hot_count() == len(full.hot) * cfg.intermediate_size          # everything fits
    assert full.lm_head_on_gpu and full.embeddings_on_gpu and full.predictors_on_gpu


def test_most_frequent_neurons_first():
    cfg = tiny_cfg()
    prof = random_profile(cfg, seed=3)
    budget = core_bytes(cfg, 512) + ffn_rows_bytes(700, cfg.hidden_size, "f16")
    for solver in ("milp", "greedy"):
        p = plan(cfg, prof, budget, context=512, solver=solver, min_active_bytes=0, group_size=1)
        assert p.lm_head_on_gpu and 500 <= p.hot_count() <= 700   # lm_head (read every token) goes first
        hot_f, cold_f = [], []
        for k, ids in p.hot.items():
            f = prof.token_frequency(*k).numpy()
            mask = np.zeros(len(f), bool)
            mask[ids] = True
            hot_f += f[mask].tolist()
            cold_f += f[~mask].tolist()
        assert min(hot_f) >= max(cold_f) - 1e-9


def test_milp_and_greedy_agree_on_small_cases():
    cfg = tiny_cfg()
    nb = ffn_rows_bytes(1, cfg.hidden_size, "f16")
    for seed in range(3):
        prof = random_profile(cfg, seed=seed)
        for extra in (10 * nb, 333 * nb, 1500 * nb):
            budget = core_bytes(cfg, 512) + extra
            kw = dict(context=512, min_active_bytes=0, group_size=1)
            a, b = plan(cfg, prof, budget, solver="milp", **kw), plan(cfg, prof, budget, solver="greedy", **kw)
            assert a.solver.startswith(("milp", "greedy (everything")) and b.solver == "greedy"
            one = float(max(prof.token_frequency(*k).max() for k in prof.counts))
            assert abs(value(cfg, prof, a) - value(cfg, prof, b)) <= one + 1e-9
            read = 3 * cfg.hidden_size * 2          # the whole objective: bytes per token from the GPU
            assert abs(a.stats["gpu_bytes_per_token"] - b.stats["gpu_bytes_per_token"]) <= one * read + 1e-6
        # with a sync constraint the MILP is never worse than greedy
        m = 2 * 3 * cfg.hidden_size * 2 * 0.3
        kw = dict(context=512, min_active_bytes=m, group_size=8)
        a, b = plan(cfg, prof, budget, solver="milp", **kw), plan(cfg, prof, budget, solver="greedy", **kw)
        assert a.stats["gpu_bytes_per_token"] >= b.stats["gpu_bytes_per_token"] * (1 - 1e-6)


def test_sync_constraint_all_or_enough():
    cfg = tiny_cfg()
    prof = random_profile(cfg, seed=1)
    read = 3 * cfg.hidden_size * 2
    m = 40 * read * 0.2        # an FFN's GPU part must serve >= 8 average-neuron reads per token
    for solver in ("milp", "greedy"):
        for extra in (100, 1000, 3000):
            p = plan(cfg, prof, core_bytes(cfg, 512) + ffn_rows_bytes(extra, cfg.hidden_size, "f16"),
                     context=512, solver=solver, min_active_bytes=m, group_size=16)
            for k, ids in p.hot.items():
                served = float(prof.token_frequency(*k)[torch.as_tensor(ids, dtype=torch.long)].sum()) * read
                assert len(ids) == 0 or served >= m - 1e-6 or len(ids) == cfg.intermediate_size
    # the default threshold: ~1 MB served per token (10 us sync at 100 GB/s vs 3 TB/s)
    assert 1.0e6 < MIN_ACTIVE_BYTES < 1.1e6


def test_uniform_profile_and_wrong_profile():
    cfg = tiny_cfg()
    p = plan(cfg, None, core_bytes(cfg, 512) + 50 * KiB, context=512, min_active_bytes=0)
    assert p.hot_count() > 0 and p.gpu_bytes <= p.budget_bytes
    other = random_profile(tiny_cfg(num_hidden_layers=3))
    with pytest.raises(HybridInferError, match="another model"):
        plan(cfg, other, 10 * MiB)
    with pytest.raises(HybridInferError, match="negative"):
        plan(cfg, None, -1)
    with pytest.raises(HybridInferError, match="format"):
        plan(cfg, None, MiB, fmt="q3_k")
    with pytest.raises(HybridInferError, match="context"):
        plan(cfg, None, MiB, context=10**9)
    with pytest.raises(HybridInferError, match="divisible"):
        plan(tiny_cfg(hidden_size=48, num_attention_heads=4), None, MiB, fmt="q4_0")


def test_placement_file_round_trip(tmp_path):
    cfg = tiny_cfg()
    p = plan(cfg, random_profile(cfg), core_bytes(cfg, 512) + 100 * KiB, context=512, fmt="q8_0",
             min_active_bytes=0)
    out = p.save(tmp_path / "plans" / "p.json")
    assert [f.name for f in out.parent.iterdir()] == ["p.json"]
    back = Placement.load(out, expect_model_id=model_identity(cfg))
    assert back.hot.keys() == p.hot.keys() and all(np.array_equal(back.hot[k], v) for k, v in p.hot.items())
    for f in ("schema_version", "model_id", "budget_bytes", "gpu_bytes", "context", "fmt", "attention_on_gpu",
              "embeddings_on_gpu", "lm_head_on_gpu", "kv_on_gpu", "predictors_on_gpu", "components"):
        assert getattr(back, f) == getattr(p, f)
    with pytest.raises(HybridInferError, match="another model"):
        Placement.load(out, expect_model_id="x")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(HybridInferError, match="not a valid placement"):
        Placement.load(tmp_path / "bad.json")
    assert "ffn_hot" in summary(p) and "expected share" in summary(p)


def test_plan_cli(tmp_path, capsys):
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM")
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(folder), "--vram-budget", "2MiB", "--context", "256",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "expected bytes per token" in text
    p = Placement.load(out)
    assert p.gpu_bytes <= 2 * MiB and p.context == 256
    for budget, msg in [("abc", "bad VRAM budget"), ("=-5GB", "bad VRAM budget")]:
        assert main(["plan", "--model", str(folder), "--vram-budget", budget]) == 2
        assert msg in capsys.readouterr().err
    assert main(["plan", "--model", str(folder), "--vram-budget", "1GiB", "--profile",
                 str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # the warm tier: off by default, a summary line with --pcie-share, one error line when out of range
    args = ["plan", "--model", str(folder), "--vram-budget", "250KB", "--context", "64", "--out", str(out)]
    assert main(args) == 0 and "warm neurons" not in capsys.readouterr().out
    assert Placement.load(out).warm == {}
    assert main(args + ["--pcie-share", "0.5"]) == 0 and "warm neurons" in capsys.readouterr().out
    p = Placement.load(out)
    # the realised share over all FFNs: each FFN's smallest prefix reaching 0.5 of its mass
    assert p.warm_count() > 0 and p.stats["pcie_share"] == pytest.approx(0.5, abs=0.05)
    assert p.gpu_bytes <= 250_000
    assert main(args + ["--pcie-share", "auto"]) == 0   # tiny FFNs: a CPU half's fixed cost
    p = Placement.load(out)                              # outweighs their few bytes: all warm
    assert p.warm_count() > 0 and p.stats["cpu_bytes_per_token"] == 0
    with pytest.raises(SystemExit) as e:                          # argparse's usage error, one line
        main(args + ["--pcie-share", "2"])
    assert e.value.code == 2 and "pcie share 2.0 is outside" in capsys.readouterr().err


def test_47b_scale_solves_fast():
    """32 layers x 8 experts x 14336 neurons (TurboSparse-Mixtral), q4_0 rows, 16 GiB."""
    from hybridinfer.bench.workload import random_profile, shape_config
    cfg = shape_config("M47")[0]
    prof = random_profile(cfg, seed=0)
    t = time.perf_counter()
    p = plan(cfg, prof, 16 * GiB, context=4096, fmt="q4_0", predictor_numel=4_900_000_000 // 8)
    assert time.perf_counter() - t <= 10.0
    assert p.solver == "milp" and p.gpu_bytes <= 16 * GiB and p.hot_count() > 0


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_warm_tier_is_the_next_frequency_prefix(solver):
    from hybridinfer.footprint import warm_ids_bytes

    cfg = tiny_cfg()
    prof = random_profile(cfg, seed=5, tokens=4000, skewed=True)
    for c in prof.counts.values():          # some neurons the profile never saw fire
        c[::7] = 0
    n_all = cfg.num_layers * cfg.num_experts * cfg.intermediate_size
    core = core_bytes(cfg, 512)
    base_kw = dict(context=512, solver=solver, min_active_bytes=0, group_size=4, predictor_numel=2000)
    never_fired_warm = 0
    for extra in (0, warm_ids_bytes(n_all) - 1, warm_ids_bytes(n_all) + 30 * KiB, 300 * KiB, 10 * MiB):
        for share in (0.0, 0.3, 0.6, 1.0):
            budget = core + extra
            p = plan(cfg, prof, budget, pcie_share=share, **base_kw)
            comp = gpu_component_bytes(cfg, p)
            assert p.gpu_bytes == sum(comp.values()) <= budget
            assert comp["ffn_warm_ids"] == 4 * p.warm_count()
            if share == 0 or extra < warm_ids_bytes(n_all):   # no room for the ids: no warm tier
                assert p.warm == {} and p.stats["pcie_bytes_per_token"] == 0
                continue
            # the hot rows had the budget less the ids of every neuron
            assert p.gpu_bytes - comp["ffn_warm_ids"] <= budget - warm_ids_bytes(n_all)
            read = 3 * cfg.hidden_size * 2
            pcie = 0.0
            for k, hot in p.hot.items():
                warm = p.warm.get(k, np.zeros(0, np.int32))
                assert warm.dtype == np.int32 and np.all(np.diff(warm) > 0)
                assert not np.intersect1d(hot, warm).size
                f = prof.token_frequency(*k).double().numpy()
                rest = np.setdiff1d(np.arange(len(f)), hot)
                if len(warm):     # every warm neuron fires at least as often as every other non-hot one
                    other = np.setdiff1d(rest, warm)
                    assert len(other) == 0 or f[warm].min() >= f[other].max() - 1e-12
                mass, wm = f[rest].sum(), f[warm].sum()
                if share == 1.0:   # every non-hot neuron, also those never seen firing (no CPU half)
                    assert np.array_equal(warm, rest.astype(np.int32))
                    never_fired_warm += int((f[warm] == 0).sum())
                assert wm >= share * mass * (1 - 1e-9)           # reaches the share ...
                if len(warm):                                     # ... and is the smallest such prefix
                    assert wm - f[warm].min() < share * mass * (1 + 1e-9)
                pcie += wm * read
            assert p.stats["pcie_bytes_per_token"] == pytest.approx(pcie)
            assert p.stats["warm_neurons"] == p.warm_count()
            assert (p.warm_count() > 0) == (p.hot_count() < n_all)   # all hot: nothing left to be warm
    assert never_fired_warm > 0
    # the CPU's share excludes what the GPU reads over PCIe; the totals stay the same
    a = plan(cfg, prof, core + 300 * KiB, pcie_share=0.0, **base_kw)
    b = plan(cfg, prof, core + 300 * KiB + warm_ids_bytes(n_all), pcie_share=0.5, **base_kw)
    assert a.hot_count() == b.hot_count()
    assert b.stats["cpu_bytes_per_token"] + b.stats["pcie_bytes_per_token"] == pytest.approx(
        a.stats["cpu_bytes_per_token"])
    assert "warm neurons" in summary(b) and "warm neurons" not in summary(a)
    for bad in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(HybridInferError, match="pcie share"):
            plan(cfg, prof, core, pcie_share=bad)


def test_auto_warm_share_balances_cpu_and_pcie_time():
    """pcie_share "auto": per FFN, the share s that makes the CPU's time for its cold rows,
    (1 - s) B / COLD_CPU_GBS, equal to the GPU's over PCIe, PCIE_LATENCY_S + s B / ZERO_COPY_GBS,
    for B its expected non-hot bytes per call; or 1 (all warm: no CPU half) where the GPU reading
    all of it is faster than that split plus the CPU half's fixed cost, COLD_CPU_FIXED_S."""
    from hybridinfer.budget import (COLD_CPU_FIXED_S, COLD_CPU_GBS, PCIE_LATENCY_S, ZERO_COPY_GBS,
                                    balanced_share)

    for mb in (0, 0.1, 0.63, 1, 2):          # small B: the CPU half's fixed cost decides
        assert balanced_share(mb * 1e6) == 1.0
    prev, n_split = 0.0, 0
    for mb in (1, 2, 3, 5, 20, 100, 10_000):
        b = mb * 1e6
        s = balanced_share(b)
        t_cpu, t_pcie = b / COLD_CPU_GBS, b / ZERO_COPY_GBS
        if s == 1.0:
            assert (1 - (t_cpu - PCIE_LATENCY_S) / (t_cpu + t_pcie)) * t_cpu + COLD_CPU_FIXED_S \
                > PCIE_LATENCY_S + t_pcie
            continue
        assert prev < s < ZERO_COPY_GBS / (ZERO_COPY_GBS + COLD_CPU_GBS)   # rises to the bandwidths' ratio
        assert (1 - s) * t_cpu == pytest.approx(PCIE_LATENCY_S + s * t_pcie)
        assert (1 - s) * t_cpu + COLD_CPU_FIXED_S <= PCIE_LATENCY_S + t_pcie   # the split is faster
        prev, n_split = s, n_split + 1
    assert n_split >= 4
    # a model whose experts read MBs a call (M47's shapes, 2 layers): each FFN's warm mass is its
    # balanced share of its non-hot mass; a budget that holds far more hot rows leaves less per
    # call, so a smaller share
    from hybridinfer.bench.workload import make_workload, synthetic_profile
    wl = make_workload("M47", 2, 0)
    cfg, prof = wl.cfg, synthetic_profile(wl)
    route = cfg.experts_per_token / cfg.num_experts
    shares = []
    for gib in (0.3, 0.5, 1.0):      # M47 at ~5, ~8 and ~16 GiB, scaled to 2 layers
        p = plan(cfg, prof, int(gib * GiB), context=512, fmt="q4_0", pcie_share="auto", solver="greedy")
        assert p.warm_count() > 0 and p.gpu_bytes <= gib * GiB
        read = 3 * 4096 // 32 * 18
        for k, hot in p.hot.items():
            f = prof.token_frequency(*k).double().numpy()
            rest = np.setdiff1d(np.arange(len(f)), hot)
            mass = f[rest].sum()
            s = balanced_share(mass * read / route)
            wm = f[p.warm.get(k, [])].sum()
            assert wm >= s * mass * (1 - 1e-9) and wm - (f[p.warm[k]].min() if k in p.warm else 0) < s * mass + 1e-12
        shares.append(p.stats["pcie_share"])
    assert 1 > shares[0] > shares[1] > 0     # the balance: more hot rows, fewer bytes a call
    assert shares[2] == 1.0                   # a few MB a call: all warm, no CPU half


def test_placement_file_with_warm_and_without(tmp_path):
    import json

    cfg = tiny_cfg()
    p = plan(cfg, random_profile(cfg, tokens=4000, skewed=True), core_bytes(cfg, 512) + 400 * KiB, context=512, min_active_bytes=0,
             pcie_share=0.6)
    assert p.warm_count() > 0
    back = Placement.load(p.save(tmp_path / "p.json"))
    assert back.warm.keys() == p.warm.keys()
    assert all(np.array_equal(back.warm[k], v) and back.warm[k].dtype == np.int32 for k, v in p.warm.items())
    assert all(np.array_equal(back.hot[k], v) for k, v in p.hot.items()) and back.stats == p.stats
    # a file written before the warm tier (no "warm", no ffn_warm_ids) still loads, with none
    d = json.loads(p.to_json())
    del d["warm"]
    d["components"].pop("ffn_warm_ids")
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = Placement.load(tmp_path / "old.json")
    assert old.warm == {} and old.warm_count() == 0
    assert all(np.array_equal(old.hot[k], v) for k, v in p.hot.items())
    assert gpu_component_bytes(cfg, old)["ffn_warm_ids"] == 0
