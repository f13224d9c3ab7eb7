"""Predictors: TurboSparse semantics, loading from every source under one naming, training on a
planted toy reaches the recall target, save/load round trip, bad input."""
from __future__ import annotations

import json

import pytest
import torch

import hybridinfer
from hybridinfer.checkpoint import ffn_names, save_checkpoint
from hybridinfer.cli import main
from hybridinfer.config import ModelConfig
from hybridinfer.default_model import byte_tokenizer_json
from hybridinfer.errors import HybridInferError
from hybridinfer.predictor import (PREDICTOR_FILE, Predictor, load_predictors, logit_threshold, predictor_names,
                                   predictor_numel, save_predictors, shipped_input)
from hybridinfer.predictor_train import train_predictors
from hybridinfer.profile import read_corpus
from hybridinfer.synth import config_dict, random_tensors
from tiny import TOKENIZER_CONFIG


def planted_model(folder, rank_true=4, seed=0):
    """A ReLU-Llama whose gate has rank `rank_true`: a neuron fires iff (U V x)_i > 0, so a predictor
    of rank >= 2 * rank_true can be exact (fc1 = [V; -V], fc2 = [U, -U])."""
    c = config_dict("LlamaForCausalLM", hidden_act="relu", vocab_size=261)
    cfg = ModelConfig.from_dict(c)
    t = random_tensors(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in range(cfg.num_layers):
        n = ffn_names(cfg.family, layer)
        t[n["gate"]] = torch.randn(cfg.intermediate_size, rank_true, generator=g) @ \
            torch.randn(rank_true, cfg.hidden_size, generator=g) * 0.05
    save_checkpoint(folder, c, t, extra_files={"tokenizer.json": byte_tokenizer_json(),
                                               "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG)})
    return folder, cfg


def test_turbosparse_rule_is_score_above_zero():
    g = torch.Generator().manual_seed(0)
    fc1, fc2 = torch.randn(8, 16, generator=g), torch.randn(32, 8, generator=g)
    x = torch.randn(50, 16, generator=g)
    p = Predictor(fc1, fc2)
    turbosparse = torch.round(torch.sigmoid(fc2 @ torch.relu(fc1 @ x.T))).T.bool()   # their modeling code
    assert torch.equal(p.active(x), turbosparse)
    assert logit_threshold(0.5) == 0.0
    q = Predictor(fc1, fc2, threshold=logit_threshold(0.8))
    assert torch.equal(q.active(x), torch.sigmoid(p(x)) > 0.8)
    with pytest.raises(HybridInferError):
        logit_threshold(1.0)
    cfgs = {a: ModelConfig.from_dict(config_dict(a)) for a in ("TurboSparseMixtralForCausalLM", "BambooForCausalLM")}
    assert shipped_input(cfgs["TurboSparseMixtralForCausalLM"]) == "ffn_input"
    assert shipped_input(cfgs["BambooForCausalLM"]) == "residual"


def test_trained_predictors_reach_recall_target_on_planted_toy(tmp_path):
    folder, cfg = planted_model(tmp_path / "planted")
    llm = hybridinfer.load(folder, device="cpu", sparsity="dense")
    _, texts = read_corpus(None)
    tensors, scores = train_predictors(llm, texts, rank=16, max_tokens=2000, steps=150, progress=False)
    assert set(tensors) == {n for pair in predictor_names(cfg).values() for n in pair}
    assert len(scores) == cfg.num_layers
    for s in scores:
        assert s.recall >= 0.95 and s.predicted_ratio <= 2.0, s
    # saved in TurboSparse naming, loaded back through the one path
    out = save_predictors(tensors, tmp_path / "pred", cfg, "tutorial", 16, scores)
    assert out.name == PREDICTOR_FILE and (out.parent / "report.json").is_file()
    back = load_predictors(tmp_path / "pred", cfg)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert predictor_numel(back) == cfg.num_layers * 16 * (cfg.hidden_size + cfg.intermediate_size)


def test_moe_predictors_train_per_expert(tmp_path):
    from tiny import write_model
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM")
    llm = hybridinfer.load(folder, device="cpu", sparsity="dense")
    tensors, scores = train_predictors(llm, ["Hello there. " * 40], rank=8, max_tokens=400, steps=20,
                                       progress=False)
    cfg = llm.config
    assert len(tensors) == 2 * cfg.num_layers * cfg.num_experts
    assert "model.layers.1.block_sparse_moe.experts.3.predictor.fc2.weight" in tensors
    assert all(0 <= s.recall <= 1 and s.expert >= 0 for s in scores)


def test_powerinfer_predictor_folder_maps_to_turbosparse_names(tmp_path):
    cfg = ModelConfig.from_dict(config_dict("LlamaForCausalLM", hidden_act="relu", num_hidden_layers=11))
    pdir = tmp_path / "ReluLLaMA-Predictor"
    pdir.mkdir()
    for layer in range(11):
        torch.save({"fc1.weight": torch.full((8, cfg.hidden_size), float(layer)),
                    "fc2.weight": torch.zeros(cfg.intermediate_size, 8)}, pdir / f"model_{layer}.pt")
    t = load_predictors(pdir, cfg)
    assert len(t) == 22
    assert float(t["model.layers.10.mlp.predictor.fc1.weight"][0, 0]) == 10.0
    assert float(t["model.layers.2.mlp.predictor.fc1.weight"][0, 0]) == 2.0
    short = ModelConfig.from_dict(config_dict("LlamaForCausalLM", hidden_act="relu", num_hidden_layers=4))
    with pytest.raises(HybridInferError, match="layers"):
        load_predictors(pdir, short)
    moe = ModelConfig.from_dict(config_dict("TurboSparseMixtralForCausalLM"))
    with pytest.raises(HybridInferError, match="per expert"):
        load_predictors(pdir, moe)


def test_load_predictors_rejects_bad_input(tmp_path):
    cfg = ModelConfig.from_dict(config_dict("BambooForCausalLM"))
    names = predictor_names(cfg)
    good = {}
    for n1, n2 in names.values():
        good[n1], good[n2] = torch.zeros(4, cfg.hidden_size), torch.zeros(cfg.intermediate_size, 4)
    save_predictors(good, tmp_path / "ok", cfg)
    assert len(load_predictors(tmp_path / "ok" / PREDICTOR_FILE, cfg)) == len(good)
    bad = dict(good)
    bad[names[(1, -1)][1]] = torch.zeros(cfg.intermediate_size, 5)        # fc2 does not chain
    save_predictors(bad, tmp_path / "bad", cfg)
    with pytest.raises(HybridInferError, match="does not fit"):
        load_predictors(tmp_path / "bad", cfg)
    missing = {k: v for k, v in good.items() if ".layers.1." not in k}
    save_predictors(missing, tmp_path / "missing", cfg)
    with pytest.raises(HybridInferError, match="no predictor for layer 1"):
        load_predictors(tmp_path / "missing", cfg)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(HybridInferError, match="not a valid"):
        load_predictors(tmp_path / "junk.safetensors", cfg)
    with pytest.raises(HybridInferError, match="do not exist"):
        load_predictors(tmp_path / "nothing", cfg)


def test_train_predictors_cli(tmp_path, capsys):
    folder, cfg = planted_model(tmp_path / "planted")
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some text to record activations on. " * 60)
    assert main(["train-predictors", "--model", str(folder), "--corpus", str(corpus), "--rank", "8",
                 "--tokens", "800", "--steps", "30", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "recall" in text and "wrote" in text
    assert len(load_predictors(tmp_path / "out", cfg)) == 2 * cfg.num_layers
    with pytest.raises(SystemExit):          # argparse: "--rank: must be >= 1"
        main(["train-predictors", "--model", str(folder), "--rank", "0"])
