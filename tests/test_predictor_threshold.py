"""The predictor score threshold: calibration on a planted toy meets the recall target (or says it
cannot), predictor_config.json is found beside the predictors in use, an explicit option wins,
a bad file or value is a one-line error."""
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
from hybridinfer.ffn import HybridFFN
from hybridinfer.predictor import CONFIG_FILE, load_predictors, predictor_names, read_predictor_config, save_predictors
from hybridinfer.predictor_train import _pooled, calibrate_threshold, record_scores
from hybridinfer.synth import config_dict, random_tensors
from tiny import TOKENIZER_CONFIG, write_model

TEXT = ("The list type is a mutable sequence. A dictionary maps keys to values; the for statement "
        "iterates over the items of any sequence, in the order that they appear. ") * 12


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDINFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def planted(folder, noise: float, seed: int = 0):
    """A ReLU-Llama whose gate has rank 4 (gate = U V), with predictors whose score is the gate
    pre-activation exactly (fc1 = [V; -V], fc2 = [U, -U]: U relu(Vx) - U relu(-Vx) = U V x) plus
    `noise` x W relu(R x) from 8 random extra rank components (noise 0: a perfect predictor)."""
    c = config_dict("LlamaForCausalLM", hidden_act="relu", vocab_size=261)
    cfg = ModelConfig.from_dict(c)
    t = random_tensors(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    d, ff = cfg.hidden_size, cfg.intermediate_size
    for layer in range(cfg.num_layers):
        n = ffn_names(cfg.family, layer)
        U, V = torch.randn(ff, 4, generator=g) * 0.05, torch.randn(4, d, generator=g)
        R, W = torch.randn(8, d, generator=g), torch.randn(ff, 8, generator=g) * 0.05 * noise
        t[n["gate"]] = U @ V
        t[n["fc1"]] = torch.cat([V, -V, R])
        t[n["fc2"]] = torch.cat([U, -U, W], dim=1)
    save_checkpoint(folder, c, t, extra_files={"tokenizer.json": byte_tokenizer_json(),
                                               "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG)})
    return folder


def _ffns(llm):
    for blk in llm.model.blocks:
        yield from (blk.ffn.experts if hasattr(blk.ffn, "experts") else [blk.ffn])


def test_perfect_predictor_gets_a_positive_threshold(tmp_path, home):
    llm = hybridinfer.load(planted(tmp_path / "m", noise=0.0), device="cpu", sparsity="dense")
    t, rep = calibrate_threshold(llm, [TEXT], target_recall=0.95, max_tokens=600)
    z = rep["threshold_0"]
    assert z["recall"] == 1.0 and z["precision"] == 1.0            # the score is the gate itself
    assert t > 0 and 0.95 <= rep["recall"] < 0.97 and rep["ratio"] < 1.0 and rep["precision"] == 1.0
    assert len(rep["per_ffn"]) == llm.config.num_layers and rep["tokens"] == 600


def test_noisy_predictor_gets_a_negative_threshold_that_meets_the_target(tmp_path, home):
    llm = hybridinfer.load(planted(tmp_path / "m", noise=3.0), device="cpu", sparsity="dense")
    t, rep = calibrate_threshold(llm, [TEXT], target_recall=0.95, max_ratio=2.0, max_tokens=600)
    assert rep["threshold_0"]["recall"] < 0.95                      # TurboSparse's rule misses the target
    assert t < 0 and rep["recall"] >= 0.95 and rep["ratio"] <= 2.0
    # the largest such threshold on the 0.001 grid: one step up misses the target
    ids = llm.tokenizer.encode(TEXT)[:600]
    rec = record_scores(llm, [ids[:512], ids[512:]])
    assert _pooled(rec, t)[0] == rep["recall"] and _pooled(rec, t + 0.001)[0] < 0.95
    # the per-FFN rows are scored at t, pooled they give the summary
    fired = [s.tokens for s in rep["per_ffn"]]
    assert sum(fired) == rep["tokens"] * llm.config.num_layers
    # skip_tokens moves the window over the text
    _, later = calibrate_threshold(llm, [TEXT], max_tokens=300, skip_tokens=300)
    assert later["tokens"] == 300 and later["corpus"] == "(tokens 300..600)"
    with pytest.raises(HybridInferError, match="best recall"):    # too little room for a noisy one
        calibrate_threshold(llm, [TEXT], target_recall=0.999, max_ratio=1.05, max_tokens=600)
    with pytest.raises(HybridInferError, match="target recall"):
        calibrate_threshold(llm, [TEXT], target_recall=1.5)
    with pytest.raises(HybridInferError, match="dense"):
        calibrate_threshold(hybridinfer.load(tmp_path / "m", device="cpu", sparsity="exact"), [TEXT])


def test_loader_uses_the_config_beside_the_predictors_and_the_option_wins(tmp_path, home):
    folder, _, _ = write_model(tmp_path / "ts", "TurboSparseMixtralForCausalLM")

    def thresholds(**kw):
        llm = hybridinfer.load(folder, device="cpu", **kw)
        assert all(isinstance(f, HybridFFN) for f in _ffns(llm))
        return {f.predictor.threshold for f in _ffns(llm)}

    assert thresholds() == {0.0}                                   # no file: TurboSparse's rule
    (folder / CONFIG_FILE).write_text(json.dumps({"threshold": -0.75, "target_recall": 0.95}))
    assert thresholds() == {-0.75}
    assert hybridinfer.load(folder, device="cpu").model.predictor_threshold == (-0.75, str(folder / CONFIG_FILE))
    assert thresholds(predictor_threshold=0.5) == {0.5}            # the explicit option wins
    assert thresholds(predictor_threshold=0) == {0.0}
    # trained predictors from elsewhere: their own folder's file, never the model folder's
    cfg = ModelConfig.from_dir(folder)
    tensors = load_predictors(folder / "model.safetensors", cfg)
    pred = tmp_path / "pred"
    save_predictors(tensors, pred, cfg)
    assert thresholds(predictors=str(pred)) == {0.0}
    (pred / CONFIG_FILE).write_text(json.dumps({"threshold": 1.25}))
    assert thresholds(predictors=str(pred)) == {1.25}
    assert thresholds(predictors=str(pred / "predictors.safetensors")) == {1.25}
    save_predictors(tensors, pred, cfg)                            # new predictors: the stale file goes
    assert not (pred / CONFIG_FILE).exists()
    # the CLI flag reaches the runtime
    assert main(["run", "-m", str(folder), "-p", "Hi", "-n", "2", "--device", "cpu",
                 "--predictor-threshold", "0.25"]) == 0


@pytest.mark.parametrize("body, match", [("{not json", "not a readable JSON"),
                                         ('{"target_recall": 0.95}', "finite number"),
                                         ('{"threshold": "low"}', "finite number"),
                                         ('{"threshold": NaN}', "finite number"),
                                         ("[1, 2]", "finite number")])
def test_bad_config_is_a_clear_error(tmp_path, home, capsys, body, match):
    folder, _, _ = write_model(tmp_path / "ts", "TurboSparseMixtralForCausalLM")
    (folder / CONFIG_FILE).write_text(body)
    with pytest.raises(HybridInferError, match=match):
        hybridinfer.load(folder, device="cpu")
    assert main(["run", "-m", str(folder), "-p", "Hi", "-n", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and CONFIG_FILE in err and err.count("\n") == 1
    hybridinfer.load(folder, device="cpu", sparsity="exact")       # unused outside predictor mode
    hybridinfer.load(folder, device="cpu", predictor_threshold=0.1)  # an explicit value needs no file
    with pytest.raises(HybridInferError, match="finite"):
        hybridinfer.load(folder, device="cpu", predictor_threshold=float("nan"))


def test_calibrate_predictors_cli_writes_what_the_loader_reads(tmp_path, home, capsys):
    folder = planted(tmp_path / "m", noise=3.0)
    corpus = tmp_path / "heldout.txt"
    corpus.write_text(TEXT)
    assert main(["calibrate-predictors", "-m", str(folder), "--corpus", str(corpus), "--tokens", "500",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "recall" in out
    cfg = read_predictor_config(folder / CONFIG_FILE)
    assert cfg["recall"] >= 0.95 and cfg["ratio"] <= 2.0 and cfg["corpus"] == str(corpus)
    assert set(cfg) >= {"threshold", "target_recall", "recall", "ratio", "corpus"}
    llm = hybridinfer.load(folder, device="cpu", sparsity="predictor")
    assert {f.predictor.threshold for f in _ffns(llm)} == {cfg["threshold"]}
    assert len(predictor_names(llm.config)) == llm.config.num_layers
    assert main(["calibrate-predictors", "-m", str(folder), "--corpus", str(corpus), "--tokens", "500",
                 "--device", "cpu", "--max-ratio", "1.01", "--target-recall", "0.999",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "no threshold" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_the_default_model_ships_a_calibrated_threshold():
    from hybridinfer.default_model import ensure
    cfg = read_predictor_config(ensure() / CONFIG_FILE)
    assert cfg["threshold"] < 0 and cfg["recall"] >= cfg["target_recall"] == 0.95 and cfg["ratio"] <= 2.0
    assert cfg["threshold_0"]["recall"] < 0.95          # what the calibration was for
