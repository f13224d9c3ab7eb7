"""The CUDA-graph decoder's logic (segments, static cache, merges across layers, the CPU half),
run uncaptured on the cpu device against the plain decode path; captured on cuda where present."""
from __future__ import annotations

import pytest
import torch

import hybridinfer
from hybridinfer.generate import GenerationConfig, decode_one_token, generate_tokens, prefill
from hybridinfer.graphs import GraphDecoder
from test_hybrid import hybrid, placements
from tiny import random_ids, write_model

CASES = [("TurboSparseMixtralForCausalLM", "predictor", "mixed"),
         ("TurboSparseMixtralForCausalLM", "exact", "random"),
         ("TurboSparseMixtralForCausalLM", "exact", "all_cpu"),
         ("BambooForCausalLM", "predictor", "random"),
         ("MistralForCausalLM", "exact", "all_gpu")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("select_on_device,chain", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("arch,sparsity,placement", CASES)
def test_graph_decoder_equals_plain_decode(tmp_path, arch, sparsity, placement, device,
                                           select_on_device, chain):
    """select_on_device: MoE layers as one segment each, the experts chosen on the device
    (HotSlots, the predictors' slots, ColdStep's slot masks), or chosen by the host.
    chain: the cold halves served by kernels.cpu_step.ColdChain's thread on device flags (where no
    layer needs the host mid-token: MoE layers fused; on cpu this thread plays the device)."""
    gd = _check_against_plain(tmp_path, arch, sparsity, placement, device,
                              select_on_device=select_on_device, chain=chain)
    moe = arch.startswith("TurboSparseMixtral")
    assert any(gd._fused) == (select_on_device and moe)
    has_cold = placement != "all_gpu"
    assert gd._chained == (chain and (select_on_device or not moe))      # one graph a token
    assert (gd._chain is not None) == (gd._chained and has_cold)          # a chain for cold halves
    assert int(gd.flags.abs().sum()) == 0                  # every flag consumed after a token
    # a layer copies its FFN input to the host only where the host reads it
    assert gd._to_host == [gd._coldstep[l] is not None or (moe and not select_on_device)
                           for l in range(len(gd._to_host))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_graph_decoder_q4_rows_and_attention(tmp_path, device):
    """q4_0 hot rows, attention and lm_head (DeviceLinear: the Triton GEMV on cuda)."""
    _check_against_plain(tmp_path, "TurboSparseMixtralForCausalLM", "predictor", "mixed", device,
                         gpu_fmt="q4_0")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_graph_decoder_per_expert_segments(tmp_path, monkeypatch, device):
    """Too many expert choices to capture one graph each: P and H per expert instead."""
    from hybridinfer import graphs
    monkeypatch.setattr(graphs, "MAX_GROUPS", 1)
    gd = _check_against_plain(tmp_path, "TurboSparseMixtralForCausalLM", "predictor", "mixed", device,
                              select_on_device=False)
    assert not any(gd._grouped)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("chain", [True, False])
def test_graph_decoder_warm_rows_read_by_the_gpu(tmp_path, device, chain):
    """The warm tier: fused layers' GPU computes each chosen expert's warm rows (the first n_warm
    cold rows, q4_0 in GGUF layout, page-locked: read over PCIe on cuda) and the CPU the rest;
    experts with all, some and none of their cold rows warm, and one with no cold rows at all.
    Same logits as the plain decode (which computes every cold row on the CPU)."""
    import numpy as np
    from hybridinfer.config import ModelConfig
    # cuda reads q4_0 rows only; the cpu device computes the warm rows in torch (any format):
    # f32 there, so that both halves compute exactly what the plain decode does
    fmt = "q4_0" if device == "cuda" else "f32"
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM", seed=51, sliding_window=5)
    cfg = ModelConfig.from_dir(folder)
    rng = np.random.default_rng(56)
    n, hot, warm = cfg.intermediate_size, {}, {}
    for layer in range(cfg.num_layers):
        for e in range(cfg.num_experts):
            perm = rng.permutation(n)
            kind = (layer * cfg.num_experts + e) % 4
            a = {0: 0, 1: n // 4, 2: n // 3, 3: n}[kind]                  # hot rows
            b = {0: n, 1: n // 2, 2: n // 3, 3: n}[kind]                  # hot + warm
            hot[(layer, e)], warm[(layer, e)] = np.sort(perm[:a]), np.sort(perm[a:b])
    from hybridinfer.build import RuntimeOptions, build_hybrid
    from hybridinfer.checkpoint import Checkpoint
    model = build_hybrid(cfg, Checkpoint(folder), torch.device(device), torch.float32, hot,
                         RuntimeOptions(sparsity="predictor", cpu_fmt=fmt), warm=warm)
    llm = type("L", (), {"model": model})
    ids = random_ids(12, seed=53)
    ref_cache = llm.model.new_cache(16)
    gd = GraphDecoder(llm.model, 16, chain=chain)
    assert gd.warm_layers == cfg.num_layers                               # every fused layer
    off = GraphDecoder(llm.model, 16, chain=chain, warm=False)
    assert off.warm_layers == 0
    with torch.inference_mode():
        ref = [prefill(llm.model, ids[:3], ref_cache)]
        ref += [decode_one_token(llm.model, t, ref_cache) for t in ids[3:]]
        outs = []
        for dec in (gd, off):
            dec.cache.length = 0
            o = [prefill(llm.model, ids[:3], dec.cache)]
            o += [dec.step(t).clone() for t in ids[3:]]
            outs.append(torch.stack(o).cpu())
    ref = torch.stack(ref).cpu()
    err = [float((out - ref).abs().max() / ref.abs().max()) for out in outs]
    # q4_0 (cuda): the GPU's warm rows take x in float, the CPU kernels quantise it to q8_0 (the
    # plain decode): ~2e-3 apart; dropping the warm rows altogether is ~3e-2
    assert err[1] <= 1e-4 and err[0] <= (1e-4 if fmt == "f32" else 1e-2), err
    # the CPU steps skip the warm rows: a layer whose chosen experts' cold rows are all warm
    # computes nothing on the CPU
    cold_rows = [gd._coldstep[l].last_rows if gd._coldstep[l] is not None else 0
                 for l in range(cfg.num_layers)]
    all_rows = [off._coldstep[l].last_rows for l in range(cfg.num_layers)]
    assert sum(cold_rows) < sum(all_rows)


@pytest.mark.parametrize("gpu_fmt", ["auto", "q4_0"])
def test_graph_decoder_compiled_attention_step(tmp_path, gpu_fmt):
    """torch.compile of segment A's arithmetic (attn_step) gives the plain decode's logits; one
    compilation serves every layer (the cpu backend here, inductor's Triton code on cuda), also
    with the attention weights in q4_0 (DeviceLinear objects, the GEMV a custom op on cuda)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    gd = _check_against_plain(tmp_path, "TurboSparseMixtralForCausalLM", "predictor", "mixed",
                              "cpu", fuse=True, gpu_fmt=gpu_fmt)
    from hybridinfer.kernels.gpu import DeviceLinear
    assert isinstance(gd.m.blocks[1].attn.o, DeviceLinear) == (gpu_fmt == "q4_0")
    from hybridinfer.graphs import attn_step
    assert gd._attn is not attn_step                       # compiled, not fallen back
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _check_against_plain(tmp_path, arch, sparsity, placement, device, fuse=None,
                         select_on_device=None, chain=None, **opts) -> GraphDecoder:
    folder, _, _ = write_model(tmp_path / "m", arch, seed=51, sliding_window=5)
    from hybridinfer.config import ModelConfig
    hot = placements(ModelConfig.from_dir(folder), seed=52)[placement]
    llm = hybrid(folder, hot, torch.device(device), sparsity=sparsity, **opts)
    ids = random_ids(12, seed=53)
    ref_cache = llm.model.new_cache(16)
    gd = GraphDecoder(llm.model, 16, fuse=fuse, select_on_device=select_on_device, chain=chain)
    with torch.inference_mode():
        ref = [prefill(llm.model, ids[:3], ref_cache)]
        ref += [decode_one_token(llm.model, t, ref_cache) for t in ids[3:]]
        gd.cache.length = 0
        out = [prefill(llm.model, ids[:3], gd.cache)]
        out += [gd.step(t).clone() for t in ids[3:]]
    ref, out = torch.stack(ref).cpu(), torch.stack(out).cpu()
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4
    return gd


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_generate_uses_the_graph_decoder(tmp_path, temperature):
    """generate_tokens decodes through the model's graph decoder (stream: the next token chosen
    on the device, one token run ahead) and yields what the plain path yields, greedy or
    sampled with the same seed."""
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM", seed=54)
    llm = hybridinfer.load(folder, device="cpu", sparsity="exact")
    prompt = random_ids(4, seed=55)
    g = GenerationConfig(max_new_tokens=8, temperature=temperature, top_k=20, seed=3)
    plain = list(generate_tokens(llm.model, prompt, g))
    gd = llm.model.graph_decoder = GraphDecoder(llm.model, 32)
    assert gd.can_run_ahead                           # chained; embedding and lm_head on the device
    calls = []
    stream = gd.stream
    gd.stream = lambda t, n, sel: calls.append(n) or stream(t, n, sel)
    assert list(generate_tokens(llm.model, prompt, g)) == plain
    assert calls == [7]                               # the last token needs no forward pass
    assert list(generate_tokens(llm.model, prompt, g)) == plain      # the static cache is reused
    # EOS after the second token: the stream is closed with a token in flight (its position is
    # in the cache) and the next generation starts clean
    eos = plain[2]
    assert list(generate_tokens(llm.model, prompt, g, eos_ids=(eos,))) == plain[:plain.index(eos)]
    assert gd.cache.length == len(prompt) + plain.index(eos) + 1
    assert list(generate_tokens(llm.model, prompt, g)) == plain


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("placement", ["mixed", "all_gpu"])
def test_graph_decoder_stream_runs_ahead(tmp_path, device, placement):
    """stream() (run-ahead: token i+1 enqueued before token i is read; a chain for the cold
    halves, or none) yields the tokens step() + host argmax gives, the next token chosen by a
    device-side select; step-at-a-time where it cannot run ahead (no chain: per-layer loop)."""
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM", seed=57)
    from hybridinfer.config import ModelConfig
    hot = placements(ModelConfig.from_dir(folder), seed=58)[placement]
    llm = hybrid(folder, hot, torch.device(device), sparsity="predictor")
    V = llm.model.cfg.vocab_size
    offs = torch.tensor([(7 * i + 3) % V for i in range(9)], device=device)

    def select(logits, i):                            # the benchmark's spread: argmax + offset
        return (logits.argmax() + offs[i]) % V
    ref = GraphDecoder(llm.model, 16, chain=False)
    assert not ref.can_run_ahead
    tok, want = 5, []
    with torch.inference_mode():
        for i in range(9):
            tok = int(select(ref.step(tok), i))
            want.append(tok)
    gd = GraphDecoder(llm.model, 16)
    assert gd.can_run_ahead and (gd._chain is not None) == (placement == "mixed")
    assert list(gd.stream(5, 9, select)) == want
    assert gd.cache.length == 9
    assert int(gd.flags.abs().sum()) == 0
    assert list(GraphDecoder(llm.model, 16, chain=False).stream(5, 9, select)) == want   # step by step


def test_predictor_device_names_the_index():
    from hybridinfer.predictor import predictor_device

    class P:
        device = "cpu"
    assert predictor_device(P(), torch.device("cuda", 0)) == torch.device("cpu")
    assert predictor_device(object(), torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available():
        P.device = "cuda"
        assert predictor_device(P(), torch.device("cpu")) == torch.device("cuda", torch.cuda.current_device())
