"""tokenizer.json through `tokenizers`, chat templates through jinja2 (ChatML as TurboSparse)."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

from hybridinfer.errors import HybridInferError
from hybridinfer.tokenizer import Tokenizer

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture()
def mixtral_like(tmp_path):
    """A byte-level tokenizer padded so that <|im_end|> = 57000 and <|im_start|> = 57001."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: 3 + i for i, c in enumerate(alphabet)})
    vocab.update({f"<pad_{i}>": i for i in range(len(vocab), 57000)})
    tok = HFTok(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True, "chat_template": CHATML}))
    return tmp_path


def test_chatml_ids(mixtral_like):
    t = Tokenizer(mixtral_like)
    assert t.token_id("<|im_end|>") == 57000 and t.token_id("<|im_start|>") == 57001
    assert t.eos_id == 57000 and t.bos_id == 1
    text = t.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = t.encode(text, add_special_tokens=False)
    assert ids.count(57001) == 3 and ids.count(57000) == 2 and ids[0] == 57001
    assert t.decode(ids) == "system\nBe brief.\nuser\nHi\nassistant\n"    # specials skipped


def test_bos_and_roundtrip(mixtral_like):
    t = Tokenizer(mixtral_like)
    ids = t.encode("héllo wörld ✓")
    assert ids[0] == 1
    assert t.decode(ids) == "héllo wörld ✓"


def test_template_errors_and_missing_files(mixtral_like, tmp_path):
    t = Tokenizer(mixtral_like)
    with pytest.raises(HybridInferError, match="role"):
        t.render_chat([{"content": "no role"}])
    cfg = json.loads((mixtral_like / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ raise_exception('Roles must alternate') }}"
    (mixtral_like / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(HybridInferError, match="Roles must alternate"):
        Tokenizer(mixtral_like).render_chat([{"role": "user", "content": "x"}])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer.model").write_bytes(b"")
    with pytest.raises(HybridInferError, match="only tokenizer.model"):
        Tokenizer(empty)
