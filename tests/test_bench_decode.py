"""bench decode: the harness end to end on tiny shapes (CPU), the synthetic statistics, the JSON."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("hybridinfer._C")

from hybridinfer.bench import decode, workload  # noqa: E402
from hybridinfer.placement import plan  # noqa: E402


def test_firing_statistics_match_targets():
    p = workload.firing_probabilities(14336, seed=3).numpy()
    assert abs(p.mean() - workload.MEAN_FIRE) < 0.005           # ~85% inactive per token
    assert abs(workload.top_share(p) - workload.TOP20_SHARE) < 0.02   # 20% of neurons: ~80% of firings
    assert p.max() <= workload.P_MAX and p.min() > 0
    q = workload.firing_probabilities(14336, seed=4).numpy()
    assert not np.array_equal(p, q) and np.allclose(np.sort(p), np.sort(q))   # same law, new order


def test_weight_nibbles_average_zero():
    # every byte value: no nibble 0 (value -8) is left, and the values -7..7 (0 twice) average 0
    b = workload.zero_mean_nibbles(torch.arange(256, dtype=torch.uint8))
    vals = torch.cat([(b & 0x0F).long(), (b >> 4).long()]) - 8
    assert vals.min() == -7 and vals.max() == 7 and vals.sum() == 0
    pool = workload.BytePool(seed=2, nbytes=1 << 16)
    m = pool.packed(64, 256)
    q = m.view(64, 8, 18)[..., 2:]                             # the nibble bytes of each block
    v = torch.cat([(q & 0x0F).flatten(), (q >> 4).flatten()]).double() - 8
    assert (v != -8).all() and abs(v.mean()) < 0.05 and v.std() > 4   # random, centred


def test_decode_tokens_spread_over_the_vocabulary():
    from hybridinfer.bench.decode_measure import decode
    seen = []

    def step(tok):                                 # a model whose argmax never changes
        seen.append(tok)
        return torch.arange(300.0)
    decode(step, 40)
    first = list(seen)
    assert all(0 <= t < 300 for t in seen) and len(set(seen)) > 25
    seen.clear()
    decode(step, 40)
    assert seen == first                           # seeded


def test_decode_runs_a_graph_decoder_ahead_with_the_same_tokens(tmp_path, monkeypatch):
    """A graph decoder that can run ahead is driven through stream() with the spread chosen on
    the device: the same token sequence as step() + spread_token on the host."""
    from test_hybrid import hybrid, placements
    from tiny import write_model
    from hybridinfer.bench import decode_measure as dm
    from hybridinfer.config import ModelConfig
    from hybridinfer.graphs import GraphDecoder
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM", seed=59)
    llm = hybrid(folder, placements(ModelConfig.from_dir(folder), seed=60)["mixed"],
                 torch.device("cpu"), sparsity="predictor")
    host = []
    spread = dm.spread_token
    monkeypatch.setattr(dm, "spread_token", lambda lg, rng: host.append(spread(lg, rng)) or host[-1])
    slow = GraphDecoder(llm.model, 32, chain=False)
    assert not slow.can_run_ahead
    assert len(dm.decode(slow.step, 12, seed=4)) == 12
    fast, ahead = GraphDecoder(llm.model, 32), []
    stream = fast.stream
    fast.stream = lambda t, n, sel: (ahead.append(x) or x for x in stream(t, n, sel))
    assert fast.can_run_ahead
    assert len(dm.decode(fast.step, 12, seed=4)) == 12
    assert ahead == host and len(set(host)) > 3


def test_synthetic_prompt_routes_to_every_expert():
    # the residual stream stays token-specific: every layer of a prompt uses every expert, none
    # takes much more than its share (before the zero-mean nibbles and peaked attention, layers
    # 6-7 of this model gave 64 and 64 of 128 slots to one expert, one expert 1; M47's 14336-wide
    # experts collapsed to 2 experts from layer 2 on: benchmarks/routing_spread.py)
    from hybridinfer import ffn as F
    from hybridinfer.bench.decode_policies import build
    wl = workload.make_workload("T47", layers=8, seed=0)
    b = build("cpu-dense", wl, "cpu", torch.float32, torch.float32, None, None, 80)
    counts, route = [], F.route

    def spy(x, router, k):
        w, ids = route(x, router, k)
        counts.append(torch.bincount(ids.flatten(), minlength=router.shape[0]))
        return w, ids
    F.route = spy
    try:
        ids = torch.randint(0, wl.cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            b.model(ids, b.model.new_cache(65), last_only=True)
    finally:
        F.route = route
    assert len(counts) == 8
    for c in counts:                              # 128 slots over 4 experts (32 each if even)
        assert (c > 0).all() and c.max() < 56, c


def test_workload_profile_and_predictor():
    wl = workload.make_workload("T47", seed=1)
    f = wl.ffns[(0, 0)]
    d, n = wl.cfg.hidden_size, wl.cfg.intermediate_size
    assert f.gate.dtype == torch.uint8 and tuple(f.gate.shape) == (n, d // 32 * 18)
    prof = workload.synthetic_profile(wl, tokens=4000)
    assert abs(prof.sparsity() - (1 - workload.MEAN_FIRE)) < 0.02
    freq = prof.frequency(0, 0).numpy()
    assert np.corrcoef(freq, f.p.numpy())[0, 1] > 0.9          # the profile sees the fixed p_i
    # the planner puts the most frequent neurons on the GPU side
    pl = plan(wl.cfg, prof, 2 << 20, context=64, fmt="q4_0", min_active_bytes=0)
    part = [k for k, v in pl.hot.items() if 0 < len(v) < n]
    assert part
    for k in part:
        assert wl.ffns[k].p[pl.hot[k]].mean() > wl.ffns[k].p.mean()
    from hybridinfer.bench.synth_predictor import SynthPredictor
    pr = SynthPredictor(f, d, wl.rank, "cpu", seed=0)
    masks = torch.cat([pr.active(torch.randn(1, d)) for _ in range(300)])
    assert abs(masks.float().mean().item() - workload.MEAN_FIRE) < 0.02
    assert pr.scores(torch.randn(3, d)).shape == (3, n)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_synth_predictor_scores_and_slots(device):
    """The benchmark predictor's one-token scores (fc1 as a row GEMV, fc2 as the axpy) equal the
    batch path's dequantised matmuls; its device-selected form (SynthSlots, the fused decoder's)
    computes the chosen experts' scores, and masks of the right shape and density."""
    from hybridinfer.bench.synth_predictor import SynthPredictor, SynthSlots
    wl = workload.make_workload("T47", seed=2)
    d = wl.cfg.hidden_size
    preds = [SynthPredictor(wl.ffns[(0, e)], d, wl.rank, device, seed=e) for e in range(3)]
    torch.manual_seed(0)
    x = torch.randn(1, d, device=device)
    tol = 2e-2                  # the one-token kernels quantise x to q8 blocks (CPU, and the
                                # GPU's integer-dot GEMV: ~7e-3 here on the H100)
    for p in preds:
        one = p.scores(x)[0].double().cpu()
        ref = p.scores(torch.cat([x, x]))[0].double().cpu()      # the batch path
        assert float((one - ref).abs().max() / ref.abs().max()) < tol
    sl = SynthSlots(preds, 2, device)
    sel = torch.tensor([2, 0], device=device)
    out = torch.zeros(2, wl.cfg.intermediate_size, dtype=torch.bool, device=device)
    means = []
    for _ in range(50):
        sl.masks(x, sel, out)
        means.append(out.float().mean().item())
    assert abs(sum(means) / len(means) - workload.MEAN_FIRE) < 0.03
    if device == "cuda":                                          # the slot kernels' scores
        for s, e in enumerate(sel.tolist()):
            ref = preds[e].scores(x)[0]
            assert float((sl.s[s] - ref).abs().max() / ref.abs().max()) < 1e-5


def test_hybrid_policy_builds_the_warm_rows():
    """bench decode's hybrid policy plans with pcie_share and builds each FFN's warm rows first
    (build.split_rows): the same hot rows and cold rows as the build without, reordered; the cold
    rows after the warm ones in the profile's descending firing counts (ties by id)."""
    from hybridinfer.bench.decode_policies import MARGIN, build, fixed_gpu_bytes, layer_ffn_bytes

    wl = workload.make_workload("T47", seed=2)
    prof = workload.synthetic_profile(wl)
    budget = MARGIN + fixed_gpu_bytes(wl.cfg, 64) + layer_ffn_bytes(wl) // 2
    cpu = torch.device("cpu")
    a = build("hybrid", wl, cpu, torch.float32, torch.float32, budget, prof, 64)
    b = build("hybrid", wl, cpu, torch.float32, torch.float32, budget, prof, 64, pcie_share=0.5)
    assert a.placement["stats"]["warm_neurons"] == 0 < b.placement["stats"]["warm_neurons"]
    n_warm = 0
    for layer, (blk_a, blk_b) in enumerate(zip(a.model.blocks, b.model.blocks)):
        for e, (fa, fb) in enumerate(zip(blk_a.ffn.experts, blk_b.ffn.experts)):
            assert fa.n_warm == 0 and (fa.hot is None) == (fb.hot is None)
            assert fa.hot is None or torch.equal(fa.hot_ids, fb.hot_ids)
            assert sorted(fb.cold_ids.tolist()) == sorted(fa.cold_ids.tolist())
            n_warm += fb.n_warm
            warm = fb.cold_ids[:fb.n_warm].tolist()
            assert warm == sorted(warm)
            counts = prof.counts[(layer, e)]
            for f in (fa, fb):
                rest = f.cold_ids[f.n_warm:]
                key = list(zip((-counts[rest]).tolist(), rest.tolist()))
                assert key == sorted(key)
    assert n_warm == b.placement["stats"]["warm_neurons"]


@pytest.mark.parametrize("shape", ["T47", "T7"])
def test_harness_end_to_end_json(tmp_path, shape):
    out = tmp_path / "d.json"
    png = tmp_path / "d.png"
    rc = decode.main(["--shape", shape, "--device", "cpu", "--policies", *decode.POLICIES,
                      "--vram-budget", "3MiB", "1MiB", "--tokens", "3", "--warmup", "1",
                      "--prefill", "16", "--context", "64", "--threads", "1", "--json", str(out),
                      "--plot", str(png)] + (["--pcie-share", "0.5"] if shape == "T47" else []))
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["pcie_share"] == (0.5 if shape == "T47" else 0.0)      # default on the cpu device: 0
    for k in ("benchmark", "machine", "command", "roofline_inputs", "policies", "table", "threads",
              "expert_bytes", "predictor_bytes", "budget_scale", "peer_reference_issue6"):
        assert k in d, k
    assert {"cpu_read_gbs", "gpu_copy_gbs", "sync_s"} <= set(d["roofline_inputs"])
    rows = d["policies"]
    assert {r["policy"] for r in rows} == set(decode.POLICIES)
    for r in rows:
        assert "error" not in r, r
        for k in ("tok_s", "ms_token", "split_ms", "bytes_gpu", "bytes_cpu", "roofline_ms",
                  "x_roofline", "rss", "prefill_tok_s", "syncs_per_token"):
            assert k in r, (r["policy"], k)
        assert set(r["split_ms"]) == {"gpu", "cpu", "sync", "python", "host"}
        assert r["split_ms"]["python"] == r["split_ms"]["host"]       # not run ahead (cpu)
        assert r["tok_s"] > 0 and r["roofline_ms"] > 0
    hy = [r for r in rows if r["policy"] == "hybrid"]
    assert all("x_dense_offload" in r for r in hy)
    cpu_dense = next(r for r in rows if r["policy"] == "cpu-dense")
    cpu_sparse = next(r for r in rows if r["policy"] == "cpu-sparse")
    assert cpu_sparse["bytes_cpu"] < cpu_dense["bytes_cpu"]        # sparse reads fewer FFN bytes
    if decode.plot.__module__ and png.exists():
        assert png.stat().st_size > 1000


SAMPLE_SCRIPT = """
import torch
from hybridinfer.bench.synth_predictor import _sample_kernel
k = _sample_kernel()
N, E = 3000, 4
g = torch.Generator().manual_seed(0)
p = torch.rand(E, N, generator=g) * 0.4
sel = torch.tensor([3, 1])
s = torch.randn(2, N, generator=g)
out = torch.zeros(2, N, dtype=torch.bool)
ctr = torch.tensor([12345, 0], dtype=torch.int32)
hits = torch.zeros(2, N)
outs = []
for i in range(20):
    k[((N + 1023) // 1024, 2)](s, p, sel, out.view(torch.int8), ctr, N, BLOCK=1024)
    outs.append(out.clone())
    hits += out.float()
assert ctr.tolist() == [12365, 0], ctr                  # one seed step a launch, tickets reset
assert all(bool((outs[0] != o).any()) for o in outs[1:])    # fresh draws each launch
ps = p[sel]
assert abs(float(hits.mean() / 20) - float(ps.mean())) < 0.01
# the neurons' firing follows their own probability: rare ones fire rarely
lo, hi = ps < 0.05, ps > 0.35
assert float(hits[lo].mean() / 20) < 0.06 and float(hits[hi].mean() / 20) > 0.33
s[0, 5] = float("nan")                                   # the score is a real input
k[((N + 1023) // 1024, 2)](s, p, sel, out.view(torch.int8), ctr, N, BLOCK=1024)
assert not bool(out[0, 5])
print("ok")
"""


def test_synth_slots_sample_kernel_under_the_interpreter():
    """SynthSlots' one-kernel mask (CUDA path; Triton's interpreter here): per-neuron firing at
    the chosen experts' probabilities, fresh draws per launch from a device counter the kernel
    advances itself (CUDA-graph replays), and a dependency on the scores."""
    from test_triton_kernels import run_kernel_script
    assert "ok" in run_kernel_script(SAMPLE_SCRIPT, "cpu", 300)


def test_bench_kernels_cli_json(tmp_path, monkeypatch):
    # `hybridinfer bench kernels` end to end at a tiny shape (small flush buffer and weight pool):
    # the JSON the issue asks for, one row per format x density x threads, sane figures
    from hybridinfer import cli
    from hybridinfer.bench import kernels as bk, machine
    monkeypatch.setattr(bk, "POOL_BYTES", 1 << 20)
    monkeypatch.setattr(machine, "default_buffer_bytes", lambda: 8 << 20)
    out = tmp_path / "k.json"
    rc = cli.main(["bench", "kernels", "--threads", "1", "2", "--formats", "q4_0", "f16",
                   "--densities", "1.0", "0.1", "--repeat", "2", "--d-model", "256", "--n-ff", "512",
                   "--no-torch", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["read_bandwidth_gbs"] > 0 and d["shape"] == {"d_model": 256, "n_ff": 512,
                                                          "activation": "drelu", "exact": False,
                                                          "batch": 1}
    keys = {(r["format"], r["density"], r["threads"]) for r in d["rows"]}
    assert keys == {(f, p, t) for f in ("q4_0", "f16") for p in (1.0, 0.1) for t in (1, 2)}
    for r in d["rows"]:
        assert r["seconds"] > 0 and r["gbs"] > 0
        assert r["ratio"] == pytest.approx(r["gbs"] / d["read_bandwidth_gbs_by_threads"][str(r["threads"])])
    machine.release_buffer()


@pytest.mark.parametrize("policy", ["cpu-sparse", "cpu-dense"])
def test_timers_count_a_cpu_models_attention_halves(policy):
    """A CPU model decodes through its bound plan, whose attention halves are native calls held
    in the plan itself: the timers must count them (under cpu / "linear"), or bench decode
    reports their time as Python (M7 cpu-sparse read 49% "Python" before)."""
    from hybridinfer.bench.decode_measure import _Timers, decode as run_tokens, stepper
    from hybridinfer.bench.decode_policies import build

    wl = workload.make_workload("T7", None, 0)
    b = build(policy, wl, torch.device("cpu"), torch.float32, torch.float32)
    cache, step = stepper(b.model, 32, False)
    run_tokens(step, 2)                                   # binds the plan
    assert b.model._plan[1], "the CPU model should decode through its bound plan"
    plan_before = list(b.model._plan[1])
    n = 3
    with _Timers(b.model, torch.device("cpu")) as tm:
        run_tokens(step, n)
    assert tm.calls["linear"] >= n * wl.cfg.num_layers    # every layer's attention half, each token
    assert tm.parts["linear"] > 0 and tm.cpu >= tm.parts["linear"]
    assert b.model._plan[1] == plan_before                # restored
