"""The bundled default model (hybridinfer/data/default_model): it ships complete, runs offline by
default, writes real text, its exact mode equals dense, its predictors are close to dense, and its
shipped profile matches a fresh profile of the shipped weights on the bundled corpus."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from hybridinfer import default_model
from hybridinfer.build import RuntimeOptions, build_hybrid
from hybridinfer.checkpoint import Checkpoint
from hybridinfer.cli import main
from hybridinfer.config import ModelConfig
from hybridinfer.llm import LLM
from hybridinfer.model import build_model
from hybridinfer.profile import NeuronProfile, default_corpus, model_identity, profile_model
from hybridinfer.tokenizer import Tokenizer

FOLDER = default_model.ensure()
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.from_dir(FOLDER)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(FOLDER)


@pytest.fixture(scope="module")
def dense(cfg, tok) -> LLM:
    return LLM(build_model(cfg, Checkpoint(FOLDER), CPU, torch.float32, with_predictors=False), tok, FOLDER)


@pytest.fixture(scope="module")
def ids(tok) -> list[int]:
    return tok.encode(default_corpus()[:4000])[:200]


@pytest.fixture(scope="module")
def profile(cfg) -> NeuronProfile:
    return NeuronProfile.load(FOLDER / "profile.safetensors", expect_model_id=model_identity(cfg))


def test_ships_complete_in_turbosparse_layout(cfg):
    files = {p.name: p.stat().st_size for p in FOLDER.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "profile.safetensors"):
        assert name in files
    assert sum(files.values()) <= 32 * 2**20
    raw = json.loads((FOLDER / "config.json").read_text())
    assert raw["architectures"] == ["TurboSparseMixtralForCausalLM"] and raw["model_type"] == "turbosparsemixtral"
    assert raw["hidden_act"] == "relu" and raw["num_experts_per_tok"] == 2 and raw["num_local_experts"] == 8
    assert cfg.activation == "drelu" and cfg.is_moe
    ck = Checkpoint(FOLDER)
    for layer in range(cfg.num_layers):
        for e in range(cfg.num_experts):
            p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            assert all(p + n in ck for n in ("w1.weight", "w2.weight", "w3.weight",
                                             "predictor.fc1.weight", "predictor.fc2.weight"))
    t = Tokenizer(FOLDER)
    assert [t.token_id(s) for s in default_model.SPECIALS] == [0, 1, 2, 3, 4]
    chat = t.render_chat([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_default_run_writes_real_text(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRIDINFER_HOME", str(tmp_path))       # nothing cached from earlier runs
    assert main(["run", "-p", "The list type", "-n", "40", "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The list type") and len(out) > 60
    words = out.split()
    real = [w for w in words if re.fullmatch(r"[(\"']?[A-Za-z][a-z]*[.,:;)\"']*", w)]
    assert out.isascii() and len(real) >= 0.7 * len(words), out


def test_exact_equals_dense(cfg, dense, ids, profile):
    ref = dense.logits(ids)
    rng = np.random.default_rng(0)
    hot_top = {k: np.sort(torch.argsort(c, descending=True)[:cfg.intermediate_size // 4].numpy())
               for k, c in profile.counts.items()}                   # the hottest quarter "on the GPU"
    for hot in ({}, hot_top, {k: np.sort(rng.choice(cfg.intermediate_size, 100, replace=False)) for k in hot_top}):
        net = build_hybrid(cfg, Checkpoint(FOLDER), CPU, torch.float32, hot, RuntimeOptions(sparsity="exact"))
        got = LLM(net, dense.tokenizer, FOLDER).logits(ids)
        assert torch.allclose(got, ref, atol=2e-4, rtol=0), float((got - ref).abs().max())
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


def _nll(llm: LLM, ids: list[int]) -> float:
    lp = torch.log_softmax(llm.logits(ids).double(), dim=-1)
    return -float(lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean())


def test_predictor_mode_is_close_to_dense(cfg, dense, ids):
    net = build_hybrid(cfg, Checkpoint(FOLDER), CPU, torch.float32, {}, RuntimeOptions(sparsity="predictor"))
    ppl_pred, ppl_dense = math.exp(_nll(LLM(net, dense.tokenizer, FOLDER), ids)), math.exp(_nll(dense, ids))
    assert ppl_pred <= ppl_dense * 1.03, (ppl_pred, ppl_dense)


def test_shipped_profile_matches_a_fresh_profile(cfg, dense, profile):
    """Fresh counts on 8 windows spread over the bundled corpus vs the shipped profile (all of it):
    the firing rates differ by no more than the fresh sample's own sampling noise, measured as the
    gap between its two halves (expected: half of it); a profile of other neurons (shuffled) is
    caught by the same check, and the share of zeros agrees within a point."""
    from hybridinfer.profile import token_windows

    wins = token_windows(dense.tokenizer, [default_corpus()], profile.tokens, 512)
    texts = [dense.tokenizer.decode(w[:256]) for w in wins[3::max(1, len(wins) // 8)][:8]]
    parts = [profile_model(dense, [t], 256, progress=False) for t in texts]
    keys = sorted(profile.counts)

    def rates(ps):
        c = sum(torch.cat([p.counts[k] for k in keys]).double() for p in ps)
        n = sum(torch.cat([torch.full((cfg.intermediate_size,), p.reached(*k)) for k in keys]) for p in ps)
        return c / n.clamp(min=1), n > 0

    fresh, seen = rates(parts)
    half_a, _ = rates(parts[0::2])
    half_b, _ = rates(parts[1::2])
    shipped = torch.cat([profile.frequency(*k) for k in keys]).double()
    shuffled = torch.cat([profile.frequency(*k)[torch.randperm(cfg.intermediate_size, generator=torch.Generator().manual_seed(0))]
                          for k in keys]).double()
    noise = (half_a - half_b)[seen].abs().mean()
    assert (fresh - shipped)[seen].abs().mean() <= 0.8 * noise
    assert (fresh - shuffled)[seen].abs().mean() > noise
    zeros = 1 - sum(int(p.counts[k].sum()) for p in parts for k in keys) / (
        cfg.intermediate_size * sum(int(p.ffn_tokens.sum()) for p in parts))
    assert abs(zeros - profile.sparsity()) < 0.01
