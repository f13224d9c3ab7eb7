"""Seeded synthetic checkpoints in the exact on-disk layout of each supported family: same
config.json keys, same tensor names. Used for the bundled default model, tests and benchmarks."""
from __future__ import annotations

import torch

from .checkpoint import ffn_names, layer_prefix, router_name
from .config import ModelConfig


def config_dict(architecture: str, *, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=256, hidden_act=None,
                num_local_experts=4, num_experts_per_tok=2, **extra) -> dict:
    """A config.json for `architecture`, with the keys its public checkpoints use."""
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "MixtralForCausalLM": "mixtral", "BambooForCausalLM": "bamboo",
                  "SparseLlamaForCausalLM": "sparsellama",
                  "TurboSparseMixtralForCausalLM": "turbosparsemixtral",
                  "SuperSparseMixtralForCausalLM": "mixtral"}[architecture]
    cfg = {
        "architectures": [architecture], "model_type": model_type,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads, "vocab_size": vocab_size,
        "hidden_act": hidden_act or ("silu" if model_type in ("llama", "mistral", "mixtral")
                                     and "Sparse" not in architecture else "relu"),
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if model_type in ("mixtral", "turbosparsemixtral"):
        cfg.update(num_local_experts=num_local_experts, num_experts_per_tok=num_experts_per_tok,
                   sliding_window=None, router_aux_loss_coef=0.02, output_router_logits=False)
    if model_type == "sparsellama":
        cfg.update(hidden_act="fatrelu", hidden_act_param=0.01)
    cfg.update(extra)
    return cfg


def random_tensors(cfg: ModelConfig, seed: int = 0, dtype=torch.float32, std: float = 0.05,
                   predictor_rank: int | None = 16) -> dict[str, torch.Tensor]:
    """Every tensor the family's checkpoints hold, N(0, std) (norms near 1), from `seed`."""
    g = torch.Generator().manual_seed(seed)
    d, ff, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def rnd(*shape, scale=std):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def norm():
        return (1.0 + torch.randn(d, generator=g) * 0.1).to(dtype)

    t = {"model.embed_tokens.weight": rnd(cfg.vocab_size, d, scale=1.0),
         "model.norm.weight": norm()}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = rnd(cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = layer_prefix(i)
        t[p + "input_layernorm.weight"] = norm()
        t[p + "post_attention_layernorm.weight"] = norm()
        for name, rows, cols in (("q", cfg.num_heads * hd, d), ("k", cfg.num_kv_heads * hd, d),
                                 ("v", cfg.num_kv_heads * hd, d), ("o", d, cfg.num_heads * hd)):
            t[f"{p}self_attn.{name}_proj.weight"] = rnd(rows, cols)
            if cfg.attention_bias:
                t[f"{p}self_attn.{name}_proj.bias"] = rnd(rows)
        experts = range(cfg.num_experts) if cfg.is_moe else [None]
        if cfg.is_moe:
            t[router_name(i)] = rnd(cfg.num_experts, d, scale=1.0)
        for e in experts:
            n = ffn_names(cfg.family, i, e)
            t[n["gate"]], t[n["up"]], t[n["down"]] = rnd(ff, d), rnd(ff, d), rnd(d, ff)
            if cfg.has_builtin_predictors and predictor_rank:
                t[n["fc1"]], t[n["fc2"]] = rnd(predictor_rank, d), rnd(ff, predictor_rank)
    return t
