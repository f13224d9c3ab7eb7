"""The policies `bench decode` compares, each built from the same Workload with the runtime's own
modules (HotFFN, PackedFFN, HybridFFN, HybridMoE, build_model), and the bytes each reads per token.

  hybrid         the planner's placement at a VRAM budget: hot neurons on the GPU, cold on the CPU,
                 predictor mode; predictors on the GPU when the planner takes them
  dense-offload  whole layers' FFNs (all experts) on the GPU up to the same budget, the rest dense
                 on the CPU kernels (exact=False); attention on the GPU for every layer, as
                 llama.cpp's --n-cpu-moe (its best policy; plain -ngl also moves attention)
  gpu-dense      every FFN dense on the GPU (when the card holds the model)
  gpu-sparse     every FFN on the GPU, predictor mode: the upper bound
  cpu-dense      everything on the CPU, FFNs dense on the CPU kernels
  cpu-sparse     everything on the CPU, predictor mode (predictors on the CPU too)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..build import STREAM_ABOVE_CUDA, split_rows
from ..ffn import HybridFFN, HybridMoE
from ..footprint import ffn_rows_bytes, linear_fmt
from ..kernels.cpu import PackedFFN
from ..kernels.gpu import HotFFN
from ..model import Transformer, build_model
from ..placement import Placement, fixed_bytes, plan
from ..quant import row_bytes
from .synth_predictor import SynthPredictor
from .workload import FMT, SynthCheckpoint, Workload

POLICIES = ("hybrid", "dense-offload", "gpu-dense", "gpu-sparse", "cpu-dense", "cpu-sparse")
MARGIN = 1 << 30          # VRAM kept free under a budget for activations, prefill scratch, allocator


@dataclass(frozen=True)
class Built:
    """A policy ready to run: the model, where things are, and the expected bytes per token."""
    name: str
    budget: int | None                 # GPU-side bytes allowed (None: no budget)
    model: Transformer
    device: torch.device
    gpu_layers: int                    # layers whose FFNs are wholly on the GPU side
    hot_share: float                   # share of all FFN neurons on the GPU side
    predictors_on_gpu: bool
    note: str = ""
    placement: dict = field(default_factory=dict)   # the planner's components and stats


def _elt(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def fixed_gpu_bytes(cfg, context: int) -> int:
    """What the runtime always puts on the model's device: attention and lm_head (q4_0 rows, as
    the GPU side keeps them with q4_0 FFN rows), norms, router, embeddings and the KV cache for
    `context` positions: the planner's all-or-nothing components (placement.fixed_bytes)."""
    return sum(fixed_bytes(cfg, context, 0, FMT).values())


def layer_ffn_bytes(wl: Workload) -> int:
    c = wl.cfg
    return max(c.num_experts, 1) * ffn_rows_bytes(c.intermediate_size, c.hidden_size, FMT)


def plan_hybrid(wl: Workload, profile, budget: int, context: int, dtype, pcie_share: float = 0.0) -> Placement:
    """The planner at `budget` less MARGIN; the embedding table (which the runtime always keeps
    on the device, the planner only when it pays) is taken out of the budget when not planned.
    pcie_share: the planner's warm tier (placement.plan)."""
    cfg = wl.cfg
    b = max(0, budget - MARGIN)
    kw = dict(context=context, fmt=FMT, predictor_numel=wl.predictor_bytes // 2, pcie_share=pcie_share)
    p = plan(cfg, profile, b, **kw)
    if not p.embeddings_on_gpu:
        emb = cfg.vocab_size * cfg.hidden_size * _elt(dtype)
        p = plan(cfg, profile, max(0, b - emb), **kw)
    return p


def _keys(layer, expert):
    return (layer, -1 if expert is None else expert)


def _model(wl: Workload, device, dtype, factory) -> Transformer:
    moe = HybridMoE if wl.cfg.is_moe else None
    kw = {"moe_class": moe} if moe else {}
    # attention projections and lm_head in q4_0 wherever they land, as llama.cpp keeps them: on
    # the CPU for the C++ kernels, on the GPU for the Triton GEMV (not torch's float matmul)
    return build_model(wl.cfg, SynthCheckpoint(wl.cfg, wl.seed, device, dtype), device, dtype,
                       with_predictors=False, ffn_factory=factory, cpu_linear_fmt=FMT,
                       gpu_linear_fmt=linear_fmt(FMT), **kw)


def _hybrid_ffn(wl, key, hot_ids: np.ndarray, device, sparsity: str, pred_device, warm_ids=(),
                freq=None):
    """warm_ids: cold rows the GPU reads over PCIe in graph decode (build.split_rows: first);
    freq: the profile's firing counts of this FFN (the other cold rows in that order, as the
    runtime's build stores them) or None (by id)."""
    cfg, f = wl.cfg, wl.ffns[key]
    n, d = cfg.intermediate_size, cfg.hidden_size
    hot_np, cold_np, n_warm = split_rows(n, hot_ids, warm_ids, f" of {key}", freq)
    ids, cold_ids = torch.from_numpy(hot_np), torch.from_numpy(cold_np)
    hot = None
    if ids.numel() == n:       # all rows: no gather copy (repacked on the CPU, then moved)
        hot = HotFFN(FMT, d, f.gate, f.up, f.down_t, ids.to(torch.int32)).to(device)
    elif ids.numel():
        hot = HotFFN(FMT, d, f.gate[ids], f.up[ids], f.down_t[ids], ids.to(torch.int32)).to(device)
    cold = PackedFFN(FMT, d, n, f.gate, f.up, f.down_t)   # the workload's rows (by id), no copy
    if cold_ids.numel() == 0:
        cold = None
    elif not np.array_equal(cold_np, np.arange(n)):
        # gathered into one allocation on huge pages like the runtime's (PackedFFN.stacked: one
        # copy a prefill; torch.stack's 4 KiB pages made the frequency-ordered rows of an M7
        # cpu-sparse decode ~10% slower than the workload's own)
        cold = cold.take(cold_ids)
    pred = None
    if sparsity == "predictor":
        pred = SynthPredictor(f, d, wl.rank, pred_device, seed=wl.seed * 7919 + key[0] * 64 + key[1])
    stream = STREAM_ABOVE_CUDA if torch.device(device).type == "cuda" else None   # the runtime's default
    return HybridFFN(n, hot, cold, cold_ids, cfg.activation, cfg.act_threshold, sparsity, pred, device,
                     stream_above=stream, n_warm=n_warm)


def build_hybrid(wl: Workload, hot: dict, device, dtype, predictors_on_gpu: bool,
                 warm: dict | None = None, profile=None) -> Transformer:
    """hot[(layer, expert|-1)] = neuron ids on the GPU side; warm[...] = cold rows the GPU reads
    over PCIe in graph decode; profile: the cold rows in its frequency order (as the runtime's
    build.build_from_placement); predictor mode everywhere."""
    pdev = torch.device(device) if predictors_on_gpu else torch.device("cpu")
    empty, warm = np.zeros(0, np.int64), warm or {}
    freq = profile.counts if profile is not None else {}

    def factory(layer, expert, fetch, predictor):
        k = _keys(layer, expert)
        return _hybrid_ffn(wl, k, hot.get(k, empty), device, "predictor", pdev, warm.get(k, empty),
                           freq.get(k))
    return _model(wl, device, dtype, factory)


def build_dense(wl: Workload, gpu_layers: int, device, dtype) -> Transformer:
    """Layers < gpu_layers: every row on the GPU side; the rest on the CPU kernels; dense mode."""
    n = wl.cfg.intermediate_size
    every, none = np.arange(n), np.zeros(0, np.int64)

    def factory(layer, expert, fetch, predictor):
        k = _keys(layer, expert)
        return _hybrid_ffn(wl, k, every if layer < gpu_layers else none, device, "dense", None)
    return _model(wl, device, dtype, factory)


def build(name: str, wl: Workload, device, dtype, cpu_dtype, budget: int | None = None,
          profile=None, context: int = 4096, pcie_share: float = 0.0) -> Built:
    """pcie_share: the hybrid policy's warm tier (placement.plan; other policies ignore it)."""
    cfg, n = wl.cfg, wl.cfg.intermediate_size
    dev, cpu = torch.device(device), torch.device("cpu")
    if name == "hybrid":
        p = plan_hybrid(wl, profile, budget, context, dtype, pcie_share)
        m = build_hybrid(wl, p.hot, dev, dtype, p.predictors_on_gpu, p.warm, profile)
        share = p.hot_count() / (len(wl.ffns) * n)
        return Built(name, budget, m, dev, 0, share, p.predictors_on_gpu,
                     f"{p.hot_count():,} hot neurons, {p.warm_count():,} warm, solver {p.solver}",
                     {"components": p.components, "stats": p.stats, "gpu_bytes": p.gpu_bytes})
    if name == "dense-offload":
        room = budget - MARGIN - fixed_gpu_bytes(cfg, context)
        k = int(min(cfg.num_layers, max(0, room // layer_ffn_bytes(wl))))
        return Built(name, budget, build_dense(wl, k, dev, dtype), dev, k, k / cfg.num_layers, False,
                     f"{k} of {cfg.num_layers} layers' FFNs on the GPU")
    if name == "gpu-dense":
        return Built(name, None, build_dense(wl, cfg.num_layers, dev, dtype), dev, cfg.num_layers,
                     1.0, False, "every FFN dense on the GPU")
    if name == "gpu-sparse":
        hot = {k: np.arange(n) for k in wl.ffns}
        return Built(name, None, build_hybrid(wl, hot, dev, dtype, True), dev, cfg.num_layers, 1.0,
                     True, "every FFN on the GPU, predictor mode")
    if name == "cpu-dense":
        return Built(name, None, build_dense(wl, 0, cpu, cpu_dtype), cpu, 0, 0.0, False,
                     "all on the CPU, dense")
    if name == "cpu-sparse":
        return Built(name, None, build_hybrid(wl, {}, cpu, cpu_dtype, False, profile=profile), cpu, 0, 0.0, False,
                     "all on the CPU, predictor mode")
    raise ValueError(f"unknown policy {name!r}; expected one of {POLICIES}")


def hot_sets(b: Built) -> dict:
    """(layer, expert) -> hot ids tensor (GPU side) of a built model."""
    out = {}
    for layer, blk in enumerate(b.model.blocks):
        ffns = blk.ffn.experts if hasattr(blk.ffn, "experts") else [blk.ffn]
        for e, f in enumerate(ffns):
            key = (layer, e if wl_is_moe(blk) else -1)
            out[key] = None if f.hot is None else f.hot.ids.long().cpu()
    return out


def wl_is_moe(blk) -> bool:
    return hasattr(blk.ffn, "experts")


def _weight_bytes(w, elt: int) -> int:
    """A linear weight's bytes: a torch tensor's in dtype, packed rows' (PackedLinear /
    DeviceLinear) as they are."""
    return w.numel() * elt if isinstance(w, torch.Tensor) else w.nbytes


def bytes_per_token(b: Built, wl: Workload, ctx: float, warm: bool = False) -> dict:
    """Expected weight bytes read per token on each side, from the firing probabilities
    (an active neuron reads its 3 rows), the routing share and where each tensor lives; "pcie":
    the warm rows the GPU reads from host memory (warm: the decoder used the warm tier)."""
    cfg, dtype = wl.cfg, b.model.embed.dtype
    e, d, L = _elt(dtype), cfg.hidden_size, cfg.num_layers
    rb3 = 3 * row_bytes(d, FMT)
    side = "cpu" if b.name.startswith("cpu") else "gpu"       # "gpu": the GPU side (cpu in CI)
    pside = "gpu" if b.predictors_on_gpu and side == "gpu" else "cpu"
    out = {"gpu": 0.0, "cpu": 0.0, "pcie": 0.0}
    m = b.model
    lin = (sum(_weight_bytes(getattr(blk.attn, n), e) for blk in m.blocks for n in "qkvo")
           + _weight_bytes(m.lm_head, e))               # q4_0 where packed for the CPU kernels
    core = lin + ((2 * L + 1) * d + L * cfg.num_experts * d + d) * e
    kv = 2 * L * cfg.num_kv_heads * ctx * cfg.head_dim * e
    out[side] += core + kv
    share = wl.route_share
    hots = hot_sets(b)
    for layer, blk in enumerate(b.model.blocks):
        ffns = blk.ffn.experts if wl_is_moe(blk) else [blk.ffn]
        for i, f in enumerate(ffns):
            key = (layer, i if wl_is_moe(blk) else -1)
            p = wl.ffns[key].p.double()
            hot_ids = hots[key]
            sparse = f.sparsity == "predictor"
            w = p if sparse else torch.ones_like(p)
            g = float(w[hot_ids].sum()) if hot_ids is not None else 0.0
            n_warm = getattr(f, "n_warm", 0) if warm else 0
            pw = float(w[f.cold_ids[:n_warm]].sum()) if n_warm else 0.0
            out[side] += share * g * rb3
            out["pcie"] += share * pw * rb3
            out["cpu"] += share * (float(w.sum()) - g - pw) * rb3
            if sparse:
                out[pside] += share * f.predictor.nbytes
    return out
