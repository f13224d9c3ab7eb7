"""Logits of every supported layout against references: transformers where the architecture
exists there, an independent float64 numpy reference for all (dReLU and FATReLU included)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hybridinfer
from reference import logits as ref_logits
from tiny import ARCHS, random_ids, write_model

RTOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_float64_reference(tmp_path, arch):
    folder, cfg, _ = write_model(tmp_path / arch, arch, seed=ARCHS.index(arch) + 1,
                                 num_hidden_layers=2, intermediate_size=96)
    ids = random_ids(11, seed=3)
    ref = ref_logits(folder, ids)
    ours = hybridinfer.load(folder, device="cpu", sparsity="dense").logits(ids)
    assert ours.shape == (11, cfg["vocab_size"])
    assert rel_err(ours, ref) <= RTOL
    exact = hybridinfer.load(folder, device="cpu", sparsity="exact").logits(ids)   # the CPU kernels
    assert rel_err(exact, ref) <= RTOL


def test_fatrelu_threshold_changes_output(tmp_path):
    """ProSparse's threshold is read from hidden_act_param and matters."""
    ids = random_ids(8, seed=4)
    a, _, _ = write_model(tmp_path / "a", "SparseLlamaForCausalLM", seed=5, hidden_act_param=0.0)
    b, _, _ = write_model(tmp_path / "b", "SparseLlamaForCausalLM", seed=5, hidden_act_param=0.05)
    la, lb = hybridinfer.load(a, device="cpu", sparsity="dense").logits(ids), hybridinfer.load(b, device="cpu", sparsity="dense").logits(ids)
    assert rel_err(la, lb) > 1e-3
    assert rel_err(lb, ref_logits(b, ids)) <= RTOL


def test_sliding_window_is_applied(tmp_path):
    ids = random_ids(12, seed=6)
    a, _, _ = write_model(tmp_path / "a", "MistralForCausalLM", seed=7, sliding_window=4)
    b, _, _ = write_model(tmp_path / "b", "MistralForCausalLM", seed=7, sliding_window=None)
    la, lb = hybridinfer.load(a, device="cpu", sparsity="dense").logits(ids), hybridinfer.load(b, device="cpu", sparsity="dense").logits(ids)
    torch.testing.assert_close(la[:4], lb[:4])          # inside the window: identical
    assert rel_err(la[4:], lb[4:]) > 1e-3               # past it: the window cuts context
    assert rel_err(la, ref_logits(a, ids)) <= RTOL


def test_sharded_equals_single_file(tmp_path):
    single, _, _ = write_model(tmp_path / "single", "TurboSparseMixtralForCausalLM", seed=8)
    sharded, _, _ = write_model(tmp_path / "sharded", "TurboSparseMixtralForCausalLM", seed=8,
                                shard_bytes=60_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 3
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = random_ids(9, seed=9)
    a = hybridinfer.load(single, device="cpu", sparsity="dense").logits(ids)
    b = hybridinfer.load(sharded, device="cpu", sparsity="dense").logits(ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tmp_path, dtype):
    """bf16/f16 files load (as float32 on the CPU) and give the reference on the rounded weights."""
    folder, _, _ = write_model(tmp_path / "m", "BambooForCausalLM", seed=10, dtype=dtype)
    ids = random_ids(7, seed=11)
    llm = hybridinfer.load(folder, device="cpu", sparsity="dense")
    assert llm.model.embed.dtype == torch.float32
    assert rel_err(llm.logits(ids), ref_logits(folder, ids)) <= RTOL
    half = hybridinfer.load(folder, device="cpu", dtype=dtype, sparsity="dense").logits(ids)
    assert rel_err(half, ref_logits(folder, ids)) <= 0.05


# ---- transformers as the reference where the architecture exists there ------------------------

transformers = pytest.importorskip("transformers")

HF_CASES = [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"hidden_act": "relu"}),        # ReluLLaMA
    ("MistralForCausalLM", {"sliding_window": 5}),
    ("MixtralForCausalLM", {}),
]


def _hf_model(folder):
    m, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info   # same tensor names
    return m.eval()


@pytest.mark.parametrize("arch,extra", HF_CASES, ids=lambda v: str(v))
def test_logits_and_greedy_match_transformers(tmp_path, arch, extra):
    folder, _, _ = write_model(tmp_path / "m", arch, seed=12, **extra)
    hf = _hf_model(folder)
    llm = hybridinfer.load(folder, device="cpu", sparsity="dense")
    ids = random_ids(13, seed=13)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert rel_err(llm.logits(ids), ref) <= RTOL

    prompt = ids[:5]
    hf.generation_config.eos_token_id = None     # run the full length on both sides
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    hf_new = out[0, len(prompt):].tolist()
    from hybridinfer.generate import GenerationConfig, generate_tokens
    ours = list(generate_tokens(llm.model, prompt, GenerationConfig(max_new_tokens=12, temperature=0)))
    assert ours == hf_new


def test_route_matches_torch_topk():
    """ffn.route's top k by k max reductions = Mixtral's rule with torch.topk (no ties in
    random float logits), weights renormalised."""
    from hybridinfer.ffn import route
    g = torch.Generator().manual_seed(12)
    for k in (1, 2, 3):
        x, r = torch.randn(5, 16, generator=g), torch.randn(8, 16, generator=g)
        w, ids = route(x, r, k)
        p = torch.softmax(x @ r.T, dim=-1)
        rw, rids = torch.topk(p, k, dim=-1)
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw / rw.sum(-1, keepdim=True))
