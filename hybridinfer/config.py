"""ModelConfig: everything the runtime needs from config.json, decided by its keys alone.

The architecture string and hidden_act pick the FFN; the file name never does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import HybridInferError

# architectures[0] -> (family, is_moe). Families share one transformer; they differ in FFN and names.
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False),
    "MistralForCausalLM": ("llama", False),
    "SparseLlamaForCausalLM": ("llama", False),         # ProSparse: FATReLU (hidden_act_param)
    "BambooForCausalLM": ("bamboo", False),            # TurboSparse-Mistral, Bamboo: dReLU + predictor
    "MixtralForCausalLM": ("mixtral", True),
    "TurboSparseMixtralForCausalLM": ("turbosparse_mixtral", True),
    "SuperSparseMixtralForCausalLM": ("turbosparse_mixtral", True),  # earlier revision's naming
}
MODEL_TYPES = {  # fallback when "architectures" is missing
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "sparsellama": "SparseLlamaForCausalLM",
    "bamboo": "BambooForCausalLM", "turbosparsemixtral": "TurboSparseMixtralForCausalLM",
    "supersparsemixtral": "SuperSparseMixtralForCausalLM",
}
# The TurboSparse families say hidden_act "relu" but apply it to both gate and up (dReLU).
DRELU_FAMILIES = ("bamboo", "turbosparse_mixtral")
GATED_ACTS = {"silu": "silu", "swish": "silu", "relu": "relu", "fatrelu": "fatrelu"}


def supported_text() -> str:
    return ("supported architectures: " + ", ".join(ARCHITECTURES)
            + "; activations: " + ", ".join(sorted(GATED_ACTS)))


@dataclass(frozen=True)
class ModelConfig:
    architecture: str          # config.json architectures[0]
    family: str                # llama | bamboo | mixtral | turbosparse_mixtral
    hidden_size: int
    intermediate_size: int     # per expert for MoE
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    activation: str            # drelu | relu | fatrelu | silu  (what the FFN computes)
    act_threshold: float = 0.0  # fatrelu: a = g if g > threshold else 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0   # "linear" rope_scaling; 1.0 = none
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_experts: int = 0       # 0 = dense FFN
    experts_per_token: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_builtin_predictors(self) -> bool:
        return self.family in DRELU_FAMILIES

    @staticmethod
    def from_dict(cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else MODEL_TYPES.get(str(cfg.get("model_type", "")).lower())
        if arch not in ARCHITECTURES:
            raise HybridInferError(
                f"unknown architecture {arch or cfg.get('model_type')!r}; {supported_text()}")
        family, is_moe = ARCHITECTURES[arch]
        act_name = str(cfg.get("hidden_act", "silu")).lower()
        if act_name not in GATED_ACTS:
            raise HybridInferError(f"unsupported hidden_act {act_name!r} for {arch}; {supported_text()}")
        activation = GATED_ACTS[act_name]
        if family in DRELU_FAMILIES:
            if activation != "relu":
                raise HybridInferError(f"{arch} expects hidden_act 'relu' (dReLU), got {act_name!r}")
            activation = "drelu"
        threshold = 0.0
        if activation == "fatrelu":
            # ProSparse: FATReLU with its threshold in hidden_act_param (see docs/MODELS.md)
            threshold = float(cfg.get("hidden_act_param", cfg.get("fatrelu_threshold", 0.0)) or 0.0)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            out = dict(
                architecture=arch, family=family, hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
            )
        except KeyError as e:
            raise HybridInferError(f"config.json lacks the key {e.args[0]!r} that {arch} needs") from None
        except (TypeError, ValueError) as e:
            raise HybridInferError(f"config.json has a bad value: {e}") from None
        scaling = cfg.get("rope_scaling")
        factor = 1.0
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("linear", "default"):
                raise HybridInferError(f"rope_scaling type {kind!r} is not supported (only 'linear')")
            factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        if is_moe:
            if "num_local_experts" not in cfg:
                raise HybridInferError(f"config.json lacks num_local_experts, which {arch} needs")
            out["num_experts"] = int(cfg["num_local_experts"])
            out["experts_per_token"] = int(cfg.get("num_experts_per_tok", 2))
        c = ModelConfig(
            **out, activation=activation, act_threshold=threshold,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)), rope_scaling_factor=factor,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            sliding_window=(int(cfg["sliding_window"]) if cfg.get("sliding_window") else None),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )
        c.validate()
        return c

    def validate(self) -> None:
        if min(self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads,
               self.num_kv_heads, self.vocab_size) <= 0:
            raise HybridInferError("config.json has a non-positive size")
        if self.num_heads % self.num_kv_heads:
            raise HybridInferError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}")
        if self.is_moe and not 0 < self.experts_per_token <= self.num_experts:
            raise HybridInferError("num_experts_per_tok must be in 1..num_local_experts")

    @staticmethod
    def from_dir(path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise HybridInferError(f"{path} has no config.json")
        try:
            cfg = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HybridInferError(f"{p} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise HybridInferError(f"{p} is not a JSON object")
        return ModelConfig.from_dict(cfg)
