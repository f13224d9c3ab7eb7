"""The profiler: counts equal a brute-force count, files round-trip and reject bad input."""
from __future__ import annotations

import importlib.resources

import pytest
import torch
import torch.nn.functional as F

import hybridinfer
from hybridinfer.cli import main
from hybridinfer.config import ModelConfig
from hybridinfer.errors import HybridInferError
from hybridinfer.ffn import activate
from hybridinfer.profile import (SCHEMA_VERSION, NeuronProfile, ffn_keys, model_ffns, model_identity,
                                 profile_model, read_corpus, token_windows)
from hybridinfer.synth import config_dict
from tiny import write_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def brute_force(llm, texts, max_tokens, window=512):
    """Independent count: forward hooks recompute each FFN's activation and count per token."""
    cfg = llm.config
    counts = {k: torch.zeros(cfg.intermediate_size, dtype=torch.int64) for k in ffn_keys(cfg)}
    reached = {k: 0 for k in ffn_keys(cfg)}
    hooks = []
    for key, m in model_ffns(llm.model).items():
        def hook(mod, inputs, output, key=key):
            x = inputs[0]
            a = activate(F.linear(x, mod.gate), F.linear(x, mod.up), mod.activation, mod.threshold)
            for row in a:                       # token by token
                counts[key] += (row != 0).long()
                reached[key] += 1
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for w in token_windows(llm.tokenizer, texts, max_tokens, window):
                llm.model(torch.tensor([w]), llm.model.new_cache(len(w)))
    finally:
        for h in hooks:
            h.remove()
    return counts, reached


@pytest.mark.parametrize("arch", ["TurboSparseMixtralForCausalLM", "LlamaForCausalLM", "BambooForCausalLM"])
def test_counts_equal_brute_force(tmp_path, arch):
    folder, _, _ = write_model(tmp_path / "m", arch, hidden_act="relu" if arch == "LlamaForCausalLM" else None)
    llm = hybridinfer.load(folder, device="cpu", sparsity="dense")
    prof = profile_model(llm, [TEXT], max_tokens=300, progress=False, corpus="t", window=128)
    counts, reached = brute_force(llm, [TEXT], 300, window=128)
    assert prof.tokens == 300 and prof.model_id == model_identity(llm.config)
    for k in ffn_keys(llm.config):
        assert torch.equal(prof.counts[k], counts[k]), k
        assert prof.reached(*k) == reached[k]
        assert torch.all(prof.counts[k] <= prof.reached(*k))
    cfg = llm.config
    if cfg.is_moe:   # every token reaches exactly top-k experts per layer
        assert prof.ffn_tokens.sum(1).tolist() == [300 * cfg.experts_per_token] * cfg.num_layers
        assert prof.ffn_tokens.shape == (cfg.num_layers, cfg.num_experts)
    else:
        assert prof.ffn_tokens.shape == (cfg.num_layers, 1)
    f = prof.frequency(0, 0 if cfg.is_moe else -1)
    assert f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 1
    # the tap is removed afterwards: the model computes as before
    assert not any("activations" in m.__dict__ for m in model_ffns(llm.model).values())


def test_save_load_roundtrip(tmp_path):
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM")
    llm = hybridinfer.load(folder, device="cpu", sparsity="dense")
    prof = profile_model(llm, [TEXT], max_tokens=200, progress=False, corpus="text")
    out = prof.save(tmp_path / "p" / "prof.safetensors")
    assert [p.name for p in out.parent.iterdir()] == ["prof.safetensors"]   # no temp file left
    back = NeuronProfile.load(out, expect_model_id=model_identity(llm.config))
    assert (back.schema_version, back.model_id, back.corpus, back.tokens) == \
        (SCHEMA_VERSION, prof.model_id, "text", 200)
    assert torch.equal(back.ffn_tokens, prof.ffn_tokens)
    assert back.counts.keys() == prof.counts.keys()
    assert all(torch.equal(back.counts[k], v) for k, v in prof.counts.items())


def test_load_rejects_bad_files(tmp_path):
    cfg = ModelConfig.from_dict(config_dict("LlamaForCausalLM", hidden_act="relu"))
    counts = {k: torch.arange(cfg.intermediate_size) for k in ffn_keys(cfg)}
    prof = NeuronProfile(SCHEMA_VERSION, model_identity(cfg), "x", 200, counts,
                         torch.full((cfg.num_layers, 1), 200))
    good = prof.save(tmp_path / "good.safetensors")
    with pytest.raises(HybridInferError, match="another model"):
        NeuronProfile.load(good, expect_model_id="SomethingElse/L2")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(HybridInferError, match="not a valid hybridinfer profile"):
        NeuronProfile.load(corrupt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(HybridInferError):
        NeuronProfile.load(truncated)
    with pytest.raises(HybridInferError, match="does not exist"):
        NeuronProfile.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"counts": torch.zeros(2, 1, 4, dtype=torch.int64)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(HybridInferError):
        NeuronProfile.load(tmp_path / "nometa.safetensors")


def test_powerinfer_activation_folder(tmp_path):
    cfg = ModelConfig.from_dict(config_dict("LlamaForCausalLM", hidden_act="relu", num_hidden_layers=12))
    act = tmp_path / "activation"
    act.mkdir()
    for layer in range(12):   # layer 10 must not land before layer 2 (PowerInfer's text sort)
        torch.save(torch.full((cfg.intermediate_size,), float(layer * 10)), act / f"activation_{layer}.pt")
    prof = NeuronProfile.from_powerinfer(tmp_path, cfg)
    assert [int(prof.counts[(layer, -1)][0]) for layer in range(12)] == [10 * i for i in range(12)]
    assert prof.tokens == 110 and prof.model_id == model_identity(cfg)
    moe = ModelConfig.from_dict(config_dict("MixtralForCausalLM"))
    with pytest.raises(HybridInferError, match="mixture of experts"):
        NeuronProfile.from_powerinfer(tmp_path, moe)
    other = ModelConfig.from_dict(config_dict("LlamaForCausalLM", hidden_act="relu", num_hidden_layers=4))
    with pytest.raises(HybridInferError, match="layers"):
        NeuronProfile.from_powerinfer(tmp_path, other)


def test_shipped_corpus_is_in_the_package(tmp_path):
    f = importlib.resources.files("hybridinfer") / "data" / "python-tutorial.txt"
    assert f.is_file() and 100_000 < len(f.read_bytes()) <= 300_000
    assert (importlib.resources.files("hybridinfer") / "data" / "PSF-LICENSE.txt").is_file()
    name, texts = read_corpus(None)
    assert "python-tutorial" in name and "Python" in texts[0]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("hello world")
    assert read_corpus(tmp_path / "c")[1] == ["hello world"]
    with pytest.raises(HybridInferError, match="does not exist"):
        read_corpus(tmp_path / "nope")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(HybridInferError, match="UTF-8"):
        read_corpus(tmp_path / "bin.txt")


def test_profile_cli(tmp_path, capsys):
    folder, _, _ = write_model(tmp_path / "m", "BambooForCausalLM")
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "prof.safetensors"
    assert main(["profile", "--model", str(folder), "--corpus", str(corpus), "--tokens", "200",
                 "--out", str(out), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    prof = NeuronProfile.load(out, expect_model_id=model_identity(ModelConfig.from_dir(folder)))
    assert prof.tokens == 200 and prof.corpus == str(corpus)
    assert main(["profile", "--model", str(folder), "--corpus", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
