"""Tiny checkpoints in the exact on-disk layout of the real models, written by the tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hybridinfer.checkpoint import save_checkpoint
from hybridinfer.config import ModelConfig
from hybridinfer.default_model import byte_tokenizer_json
from hybridinfer.synth import config_dict, random_tensors

ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "SparseLlamaForCausalLM",
         "BambooForCausalLM", "TurboSparseMixtralForCausalLM", "SuperSparseMixtralForCausalLM"]

TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}


def write_model(folder: Path, arch: str, seed: int = 0, shard_bytes: int | None = None,
                dtype=torch.float32, tokenizer: bool = True, **cfg) -> tuple[Path, dict, dict]:
    """Write a random tiny model of `arch` (vocab = the byte tokenizer's 261 ids)."""
    cfg.setdefault("vocab_size", 261)
    c = config_dict(arch, **cfg)
    c["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    tensors = random_tensors(ModelConfig.from_dict(c), seed=seed, dtype=dtype)
    extra = {}
    if tokenizer:
        extra = {"tokenizer.json": byte_tokenizer_json(),
                 "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG)}
    save_checkpoint(folder, c, tensors, shard_bytes=shard_bytes, extra_files=extra)
    return folder, c, tensors


def random_ids(n: int, vocab: int = 261, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()
