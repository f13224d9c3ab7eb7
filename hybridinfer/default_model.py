"""The bundled default model: a small TurboSparse-Mixtral-layout MoE (6 layers, 8 dReLU experts,
top-2) trained on the Python 3.11 documentation, shipped inside the package with its tokenizer,
predictors and neuron profile (hybridinfer/data/default_model/, docs/DEFAULT_MODEL.md;
scripts/train_default_model.py rebuilds it). ensure() returns that folder: no download, no cache.

random_model() still writes the former tiny *random* checkpoint (byte-level tokenizer)
deterministically into the user's cache, for tests that need a throwaway model of this layout.
"""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import save_checkpoint
from .config import ModelConfig
from .synth import config_dict, random_tensors

SHIPPED = Path(__file__).resolve().parent / "data" / "default_model"
NAME = "hybridinfer-tiny-random-v1"
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def cache_root() -> Path:
    env = os.environ.get("HYBRIDINFER_HOME")
    return Path(env) if env else Path.home() / ".cache" / "hybridinfer"


def byte_tokenizer_json() -> str:
    """A byte-level BPE with no merges: specials 0..4, then the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok.to_str()


def ensure() -> Path:
    """The bundled default model's folder (inside the installed package; read it, never write it)."""
    if not (SHIPPED / "config.json").is_file() or not (SHIPPED / "model.safetensors").is_file():
        from .errors import HybridInferError
        raise HybridInferError(f"the bundled default model is missing from this install ({SHIPPED}): "
                               "reinstall hybridinfer, or pass --model")
    return SHIPPED


def random_model() -> Path:
    """A tiny random TurboSparse-Mixtral-layout model in the user's cache, created on first use
    (atomically, deterministically from a seed). Its text is noise: for tests only."""
    import json

    folder = cache_root() / "models" / NAME
    if (folder / "config.json").is_file():
        return folder
    vocab = len(SPECIALS) + 256
    cfg = config_dict("TurboSparseMixtralForCausalLM", hidden_size=128, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, num_local_experts=8, num_experts_per_tok=2,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=3)
    tensors = random_tensors(ModelConfig.from_dict(cfg), seed=20240611, predictor_rank=32)
    tok_cfg = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
               "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    return save_checkpoint(folder, cfg, tensors, extra_files={
        "tokenizer.json": byte_tokenizer_json(),
        "tokenizer_config.json": json.dumps(tok_cfg, indent=2)})
