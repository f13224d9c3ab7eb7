"""The command line: each subcommand works, and a user mistake is one clear line, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridinfer import default_model
from hybridinfer.cli import main
from tiny import write_model


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDINFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_random_model_is_created_deterministically(home, tmp_path, monkeypatch):
    a = default_model.random_model()
    monkeypatch.setenv("HYBRIDINFER_HOME", str(tmp_path / "other"))
    b = default_model.random_model()
    assert a != b
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]   # no temp folder left


def test_console_script_runs_the_default_model(home):
    env = {**os.environ, "HYBRIDINFER_HOME": str(home)}
    exe = Path(sys.executable).parent / "hybridinfer"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hybridinfer.cli"]
    out = subprocess.run(cmd + ["run", "--prompt", "Hello", "-n", "8", "--seed", "1"], env=env,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Hello") and len(out.stdout) > len("Hello\n")


def test_run_is_reproducible_and_greedy(home, capsys):
    _, a, _ = run_cli(capsys, "run", "-p", "abc", "-n", "12", "--seed", "3", "--device", "cpu")
    _, b, _ = run_cli(capsys, "run", "-p", "abc", "-n", "12", "--seed", "3", "--device", "cpu")
    assert a == b and a.startswith("abc")
    code, g, _ = run_cli(capsys, "run", "-p", "abc", "-n", "12", "--temperature", "0", "--threads", "1")
    assert code == 0 and g.startswith("abc")


def test_chat_reads_messages_from_stdin(home, capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you\n"))
    code, out, _ = run_cli(capsys, "run", "--chat", "-n", "4", "--device", "cpu")
    assert code == 0 and out.count("\n") == 2


def test_info_and_eval(tmp_path, capsys):
    folder, _, _ = write_model(tmp_path / "m", "TurboSparseMixtralForCausalLM")
    code, out, _ = run_cli(capsys, "info", "--model", str(folder))
    assert code == 0
    assert "TurboSparseMixtralForCausalLM" in out and "top-2" in out
    for comp in ("experts", "predictors", "router", "attention", "embeddings", "lm_head"):
        assert comp in out
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    code, out, _ = run_cli(capsys, "eval", "--model", str(folder), "--text", str(text), "--device", "cpu")
    ppl = float(out.split("perplexity:")[1])
    assert code == 0 and 1.0 < ppl < 261 * 10


def test_perplexity_matches_logits(tmp_path):
    import math

    import torch

    import hybridinfer
    folder, _, _ = write_model(tmp_path / "m", "LlamaForCausalLM", max_position_embeddings=16)
    llm = hybridinfer.load(folder, device="cpu")
    text = "windows of sixteen tokens, scored one after another"
    ids = llm.tokenizer.encode(text)
    assert len(ids) > 16
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, 15):                 # windows overlap by one token
        chunk = ids[s:s + 16]
        lp = torch.log_softmax(llm.logits(chunk).double(), -1)
        nll -= sum(lp[i, chunk[i + 1]].item() for i in range(len(chunk) - 1))
        n += len(chunk) - 1
    assert n == len(ids) - 1
    assert llm.perplexity(text) == pytest.approx(math.exp(nll / n), rel=1e-9)


def _one_line_error(capsys, argv, match):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err
    assert "Traceback" not in err


def test_user_mistakes_give_one_line(tmp_path, capsys, home):
    folder, cfg, _ = write_model(tmp_path / "m", "LlamaForCausalLM")
    _one_line_error(capsys, ["run", "--model", str(folder), "--prompt", ""], "empty")
    _one_line_error(capsys, ["run", "--model", str(tmp_path / "nope")], "not found")
    _one_line_error(capsys, ["run", "--model", str(folder), "--device", "tpu"], "bad device")
    _one_line_error(capsys, ["eval", "--model", str(folder), "--text", str(tmp_path / "none.txt")], "does not exist")
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooForCausalLM"]}))
    _one_line_error(capsys, ["info", "--model", str(folder)], "unknown architecture 'FooForCausalLM'")
    (folder / "config.json").write_text("[1, 2")
    _one_line_error(capsys, ["run", "--model", str(folder)], "not valid JSON")


def test_negative_n_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "-n", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "must be >= 0" in err and "Traceback" not in err
