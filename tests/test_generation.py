"""Generation: KV-cache decode vs full recompute, sampling controls, stop conditions, streaming."""
from __future__ import annotations

import pytest
import torch

import hybridinfer
from hybridinfer.errors import HybridInferError
from hybridinfer.generate import GenerationConfig, TextStream, decode_one_token, generate_tokens, prefill, sample
from tiny import random_ids, write_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder, _, _ = write_model(tmp_path_factory.mktemp("gen") / "m", "TurboSparseMixtralForCausalLM",
                               seed=21, max_position_embeddings=64)
    return hybridinfer.load(folder, device="cpu", sparsity="dense")


@pytest.mark.parametrize("arch", ["TurboSparseMixtralForCausalLM", "MistralForCausalLM"])
def test_kv_cache_decode_equals_full_recompute(tmp_path, arch):
    folder, _, _ = write_model(tmp_path / "m", arch, seed=22, sliding_window=6)
    llm = hybridinfer.load(folder, device="cpu", sparsity="dense")
    ids = random_ids(14, seed=23)
    full = llm.logits(ids)                             # one pass over all 14 positions
    cache = llm.model.new_cache(len(ids))
    with torch.inference_mode():
        steps = [prefill(llm.model, ids[:4], cache)]
        for tok in ids[4:]:
            steps.append(decode_one_token(llm.model, tok, cache))
    inc = torch.stack(steps)                           # logits at positions 3..13
    err = (inc - full[3:]).abs().max() / full.abs().max()
    assert err <= 1e-5


def test_greedy_is_argmax_of_recompute(llm):
    prompt = random_ids(5, seed=24)
    out = list(generate_tokens(llm.model, prompt, GenerationConfig(max_new_tokens=6, temperature=0)))
    assert len(out) == 6
    for i, tok in enumerate(out):                      # each token is the argmax given all before it
        assert tok == int(llm.logits(prompt + out[:i])[-1].argmax())


def test_sampling_is_seeded_and_controls_work(llm):
    prompt = random_ids(5, seed=25)
    g = GenerationConfig(max_new_tokens=10, temperature=1.0, seed=7)
    a = list(generate_tokens(llm.model, prompt, g))
    assert a == list(generate_tokens(llm.model, prompt, g))                  # same seed, same text
    assert a != list(generate_tokens(llm.model, prompt, g.with_options(seed=8)))
    greedy = list(generate_tokens(llm.model, prompt, g.with_options(temperature=0)))
    assert list(generate_tokens(llm.model, prompt, g.with_options(top_k=1))) == greedy
    assert list(generate_tokens(llm.model, prompt, g.with_options(top_p=1e-6))) == greedy


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    k2 = {sample(logits, GenerationConfig(temperature=5.0, top_k=2), gen) for _ in range(300)}
    assert k2 == {0, 1}
    probs = torch.softmax(logits, 0)                   # p0 ~0.64, p0+p1 ~0.87
    p = {sample(logits, GenerationConfig(temperature=1.0, top_p=0.8), gen) for _ in range(300)}
    assert p == {0, 1} and probs[0] < 0.8 < probs[:2].sum()


def test_eos_stops_and_max_new_tokens(llm):
    prompt = random_ids(5, seed=26)
    g = GenerationConfig(max_new_tokens=8, temperature=0)
    free = list(generate_tokens(llm.model, prompt, g))
    eos = free[3]
    first = free.index(eos)
    assert list(generate_tokens(llm.model, prompt, g, eos_ids=(eos,))) == free[:first]
    assert list(generate_tokens(llm.model, prompt, g.with_options(max_new_tokens=0))) == []
    assert len(list(generate_tokens(llm.model, prompt, g.with_options(max_new_tokens=3)))) == 3


def test_stream_equals_generate_and_stop_strings(llm):
    text = llm.generate("Hello", max_new_tokens=30, temperature=0.9, seed=3)
    assert "".join(llm.stream("Hello", max_new_tokens=30, temperature=0.9, seed=3)) == text
    stop = text[5:7]
    cut = llm.generate("Hello", max_new_tokens=30, temperature=0.9, seed=3, stop=[stop])
    assert cut == text[:text.find(stop)]


def test_text_stream_holds_back_partial_stop_and_utf8():
    pieces = {1: "ab", 2: "S", 3: "T", 4: "OP", 5: "\xe9"}
    ts = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=("STOP",))
    assert ts.push(1) == "ab"
    assert ts.push(2) == ""          # could be the start of STOP
    assert ts.push(3) == ""
    assert ts.push(4) == "" and ts.stopped
    ts = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=("SX",))
    assert ts.push(2) == "" and ts.push(3) == "ST" and ts.finish() == ""
    half = TextStream(lambda ids: "a\ufffd" if len(ids) == 1 else "a\xe9")
    assert half.push(1) == "" and half.push(2) == "a\xe9"


def test_chat_uses_template_and_stops_at_im_end(tmp_path):
    llm = hybridinfer.load(None, device="cpu")        # the default model has ChatML
    text = llm.tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert llm.tokenizer.token_id("<|im_end|>") in llm.eos_ids
    assert isinstance(llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=5), str)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_p=0.0),
                                 dict(top_k=-2), dict(nonsense=1)])
def test_bad_sampling_options(llm, bad):
    with pytest.raises(HybridInferError):
        llm.generate("Hello", **bad)


def test_empty_prompt_and_context_overflow(llm):
    with pytest.raises(HybridInferError, match="empty"):
        llm.generate("")
    with pytest.raises(HybridInferError, match="empty"):
        list(generate_tokens(llm.model, [], GenerationConfig()))
    with pytest.raises(HybridInferError, match="max_position_embeddings|holds"):
        llm.logits(random_ids(65))


def test_chunked_prefill_equals_one_pass(llm):
    ids = random_ids(23, seed=27)
    from hybridinfer.generate import prefill
    with torch.inference_mode():
        whole = prefill(llm.model, ids, llm.model.new_cache(len(ids)), chunk=64)
        parts = prefill(llm.model, ids, llm.model.new_cache(len(ids)), chunk=5)
    assert float((whole - parts).abs().max() / whole.abs().max()) <= 1e-5
