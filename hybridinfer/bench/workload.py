"""The synthetic workloads M47 and M7 of BENCHMARKS.md, made in memory from a seed (no disk).

- shapes: TurboSparse-Mixtral-47B (M47) and TurboSparse-Mistral-7B (M7), plus tiny ones for tests
  (T47, T7); `layers` scales any of them down (the dev machine holds 2-4 layers of M47).
- expert / FFN weights: GGUF q4_0 bytes written directly (random nibbles, sane f16 scales), never
  a float copy: gate, up, down^T uint8 [n_ff, row_bytes(d)] per FFN (one neuron = one row).
- predictors: one per FFN, fc1 [rank, d] and fc2 [n_ff, rank], also q4_0 (decision documented in
  docs/BENCH_DECODE.md: f16 would be 9.6 GB for M47, more than the 8 GiB budget), stored
  transposed for the axpy kernels: fc1t [d, row_bytes(rank)], fc2t [rank, row_bytes(n_ff)].
- activation statistics: per neuron a fixed firing probability p_i (power law, mean 0.15, the top
  20% of neurons carry ~80% of the firings); each token's mask is sampled from them. Random
  weights cannot fire like that on their own, so the synthetic predictor runs the real fc1/fc2
  matmuls (their cost is counted) and returns the sampled mask (bench/synth_predictor.py).
- attention, norms, router, embeddings, lm_head: float tensors made on demand by SynthCheckpoint
  (the get/names/__contains__/shape/release interface build_model reads).
- profile: a NeuronProfile of `tokens` sampled tokens (uniform top-k routing, Binomial counts from
  p), the input of the real planner.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .. import quant
from ..config import ModelConfig
from ..profile import SCHEMA_VERSION, NeuronProfile, ffn_keys, model_identity

FMT = "q4_0"
RANK = 1024              # predictor rank (the checkpoint's size implies ~1036; 1024 keeps q4_0 blocks)
MEAN_FIRE = 0.15         # ~85% of an expert's neurons inactive per token (TurboSparse paper)
TOP20_SHARE = 0.80       # share of firings carried by the 20% most frequent neurons
P_MAX = 0.98
QK_GAIN = 3.0            # q/k weights this much larger: scores of std ~9, each token attends to a few keys
O_GAIN = 0.5             # o_proj this much smaller: attention adds less of a context shared by all tokens

_BASE = {"hidden_act": "relu", "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
         "torch_dtype": "bfloat16"}
SHAPES = {
    "M47": dict(_BASE, architectures=["TurboSparseMixtralForCausalLM"], hidden_size=4096,
                intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                vocab_size=57024, rope_theta=1e6),
    "M7": dict(_BASE, architectures=["BambooForCausalLM"], hidden_size=4096,
               intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32064, rope_theta=1e4),
    "T47": dict(_BASE, architectures=["TurboSparseMixtralForCausalLM"], hidden_size=256,
                intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                vocab_size=512, rope_theta=1e6),
    "T7": dict(_BASE, architectures=["BambooForCausalLM"], hidden_size=256, intermediate_size=512,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
               rope_theta=1e4),
}


def shape_config(shape: str, layers: int | None = None) -> tuple[ModelConfig, ModelConfig]:
    """(the config run, the full-size config): `layers` replaces num_hidden_layers."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {tuple(SHAPES)}")
    full = ModelConfig.from_dict(SHAPES[shape])
    run = ModelConfig.from_dict(dict(SHAPES[shape], num_hidden_layers=layers)) if layers else full
    return run, full


def random_profile(cfg: ModelConfig, seed: int = 0, tokens: int = 10000) -> NeuronProfile:
    """A seeded profile with skewed counts at cfg's shapes, for timing the planner at scale
    (benchmarks/plan_47b.py, tests/test_placement.py): each FFN reached by 1000-4000 tokens,
    neuron i firing on rand^4 of them."""
    g = torch.Generator().manual_seed(seed)
    experts = max(cfg.num_experts, 1)
    reached = torch.randint(1000, 4000, (cfg.num_layers, experts), generator=g)
    counts = {k: (torch.rand(cfg.intermediate_size, generator=g) ** 4 * reached[k[0], max(k[1], 0)]).long()
              for k in ffn_keys(cfg)}
    return NeuronProfile(SCHEMA_VERSION, model_identity(cfg), "synthetic", tokens, counts, reached)


def rank_for(cfg: ModelConfig) -> int:
    return RANK if cfg.hidden_size >= 4096 else max(32, cfg.hidden_size // 4)


# ---- activation statistics -----------------------------------------------------------------------

def _power_law(n: int, alpha: float, mean: float, p_max: float) -> np.ndarray:
    """p_r = min(p_max, c * (r/n)^-alpha), c fixed by bisection so that mean(p) = mean."""
    w = ((np.arange(n) + 1) / n) ** -alpha
    lo, hi = 0.0, 1.0 / w.min()
    for _ in range(80):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(p_max, c * w).mean() < mean else (lo, c)
    return np.minimum(p_max, c * w)


def top_share(p: np.ndarray, top: float = 0.2) -> float:
    """Share of all firings carried by the `top` most frequent neurons."""
    s = np.sort(np.asarray(p, np.float64))[::-1]
    return float(s[: max(1, int(round(top * len(s))))].sum() / s.sum())


def firing_curve(n: int, mean: float = MEAN_FIRE, top20: float = TOP20_SHARE) -> np.ndarray:
    """float64 [n], falling: the power law whose top 20% carry `top20` of the firings."""
    lo, hi = 0.1, 4.0
    for _ in range(40):
        a = (lo + hi) / 2
        lo, hi = (a, hi) if top_share(_power_law(n, a, mean, P_MAX)) < top20 else (lo, a)
    return _power_law(n, (lo + hi) / 2, mean, P_MAX)


def firing_probabilities(n: int, seed: int, mean: float = MEAN_FIRE) -> torch.Tensor:
    """float32 [n]: p_i of one FFN, the curve in a random neuron order (fixed by the seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.from_numpy(firing_curve(n, mean)).float()[torch.randperm(n, generator=g)]


# ---- packed weights ------------------------------------------------------------------------------

def zero_mean_nibbles(b: torch.Tensor) -> torch.Tensor:
    """uint8 bytes whose 4-bit halves, read as q4_0 values (nibble - 8), average exactly zero:
    nibble 0 (value -8) becomes 8 (value 0), leaving -7..7 symmetric. Uniform nibbles average
    -0.5, a bias every row shares: summed over ~2000 active neurons it put the same large vector
    (the all-ones direction) into every token's residual stream, so after two layers all tokens
    looked alike to the router and used the same two experts (benchmarks/routing_spread.py)."""
    lo, hi = b & 0x0F, b >> 4
    lo = torch.where(lo == 0, 8, lo)
    hi = torch.where(hi == 0, 8, hi)
    return (lo | (hi << 4)).to(torch.uint8)


class BytePool:
    """Random bytes to copy from: torch.randint makes ~50 MB/s here, a copy several GB/s. The
    content of benchmark weights does not matter (each FFN still has its own memory)."""

    def __init__(self, seed: int, nbytes: int = 64 << 20):
        g = torch.Generator().manual_seed(seed)
        self.data = zero_mean_nibbles(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g))
        self.scales = ((torch.rand(1 << 16, generator=g) + 0.5) * 2e-3).to(torch.float16)
        self.pos = 0

    def take(self, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """A fresh uint8 [n] tensor filled from the pool (wrapping, shifting start each call);
        written into `out` (contiguous, n bytes) when given."""
        out = torch.empty(n, dtype=torch.uint8) if out is None else out.view(n)
        done, size = 0, self.data.numel()
        while done < n:
            s = self.pos % (size - 1)
            k = min(n - done, size - s)
            out[done:done + k] = self.data[s:s + k]
            done += k
            self.pos += k + 4099
        return out

    def packed(self, rows: int, cols: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """A valid q4_0 matrix uint8 [rows, row_bytes(cols)]: random nibbles, scales ~2e-3
        (written into `out`, contiguous, when given)."""
        nb = cols // quant.QK
        p = self.take(rows * nb * 18, out).view(rows, nb, 18)
        k = rows * nb
        idx = (torch.arange(k) * 7919 + self.pos) % self.scales.numel()
        p[..., :2] = self.scales[idx].view(torch.uint8).view(rows, nb, 2)
        return p.view(rows, nb * 18)


@dataclass(frozen=True, eq=False)
class SynthFFN:
    """One FFN's packed q4_0 rows, its predictor and its firing probabilities (all on the CPU)."""
    gate: torch.Tensor     # uint8 [n_ff, rb(d)]   W1 rows
    up: torch.Tensor       # uint8 [n_ff, rb(d)]   W3 rows
    down_t: torch.Tensor   # uint8 [n_ff, rb(d)]   W2^T rows
    fc1t: torch.Tensor     # uint8 [d, rb(rank)]   predictor fc1^T
    fc2t: torch.Tensor     # uint8 [rank, rb(n_ff)] predictor fc2^T
    p: torch.Tensor        # float32 [n_ff] firing probability per neuron

    @property
    def weight_bytes(self) -> int:
        return 3 * self.gate.numel()

    @property
    def predictor_bytes(self) -> int:
        return self.fc1t.numel() + self.fc2t.numel()


@dataclass(frozen=True, eq=False)
class Workload:
    cfg: ModelConfig
    full_cfg: ModelConfig
    shape: str
    seed: int
    rank: int
    ffns: dict            # (layer, expert|-1) -> SynthFFN

    @property
    def expert_bytes(self) -> int:
        return sum(f.weight_bytes for f in self.ffns.values())

    @property
    def predictor_bytes(self) -> int:
        return sum(f.predictor_bytes for f in self.ffns.values())

    @property
    def route_share(self) -> float:
        """Share of tokens reaching one FFN (top-k of E experts, uniform routing)."""
        c = self.cfg
        return c.experts_per_token / c.num_experts if c.is_moe else 1.0


def make_workload(shape: str, layers: int | None = None, seed: int = 0) -> Workload:
    cfg, full = shape_config(shape, layers)
    d, n, r = cfg.hidden_size, cfg.intermediate_size, rank_for(cfg)
    pool = BytePool(seed)
    ffns = {}
    for key in ffn_keys(cfg):
        s = seed * 1_000_003 + key[0] * 64 + key[1] + 1
        # gate, up, down_t in one allocation (quant.stacked3: a prefill copies them in one call)
        rows = torch.empty(3, n, quant.row_bytes(d, "q4_0"), dtype=torch.uint8)
        for i in range(3):
            pool.packed(n, d, rows[i])
        ffns[key] = SynthFFN(*rows.unbind(0), pool.packed(d, r), pool.packed(r, n), firing_probabilities(n, s))
    return Workload(cfg, full, shape, seed, r, ffns)


def synthetic_profile(w: Workload, tokens: int = 4096, seed: int = 1) -> NeuronProfile:
    """Counts of `tokens` sampled tokens: uniform top-k routing, Binomial(reached, p_i) firings."""
    cfg, g = w.cfg, torch.Generator().manual_seed(seed)
    cols = cfg.num_experts if cfg.is_moe else 1
    reached = torch.zeros(cfg.num_layers, cols, dtype=torch.int64)
    for layer in range(cfg.num_layers):
        if cfg.is_moe:
            sel = torch.rand(tokens, cols, generator=g).argsort(dim=1)[:, :cfg.experts_per_token]
            reached[layer] = torch.bincount(sel.flatten(), minlength=cols)
        else:
            reached[layer, 0] = tokens
    counts = {}
    for (layer, e), f in w.ffns.items():
        n = reached[layer, max(e, 0)].double().expand(f.p.numel())
        counts[(layer, e)] = torch.binomial(n, f.p.double(), generator=g).to(torch.int64)
    return NeuronProfile(SCHEMA_VERSION, model_identity(cfg), f"synthetic:{w.shape}:seed{w.seed}",
                         tokens, counts, reached)


# ---- the non-FFN tensors -------------------------------------------------------------------------

class SynthCheckpoint:
    """Attention, norms, router, embeddings, lm_head made on request from the name and a seed,
    directly on `device` in `dtype` (build_model's .to() is then a no-op). No FFN tensors: the
    benchmark's ffn_factory builds FFNs from the Workload's packed rows."""
    folder = "<synthetic>"

    def __init__(self, cfg: ModelConfig, seed: int, device, dtype):
        self.cfg, self.seed, self.device, self.dtype = cfg, seed, torch.device(device), dtype

    def names(self) -> set[str]:
        return {"lm_head.weight"}

    def __contains__(self, name: str) -> bool:
        return name == "lm_head.weight"     # predictors are not read from here

    def shape(self, name: str):
        raise KeyError(name)

    def release(self, name: str) -> None:
        pass

    def get(self, name: str, shape=None) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        g = torch.Generator(device=self.device).manual_seed(self.seed ^ zlib.crc32(name.encode()))
        std = 1.0 if "embed" in name else 1.0 / math.sqrt(shape[-1])
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            std *= QK_GAIN
        if name.endswith("o_proj.weight"):
            std *= O_GAIN
        t = torch.randn(shape, generator=g, device=self.device, dtype=torch.float32 if
                        self.device.type == "cpu" else self.dtype)
        return t.mul_(std).to(self.dtype)
