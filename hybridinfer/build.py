"""The build stage: a checkpoint + a placement -> a Transformer whose FFNs are HybridFFN
(hot rows on the GPU side, cold rows packed for the CPU kernels), built once at load."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import HybridInferError
from .ffn import SPARSITY_MODES, HybridFFN, HybridMoE
from .kernels.cpu import PackedFFN
from .kernels.gpu import HotFFN
from .model import Transformer, build_model
from . import footprint, quant
from .quant import FORMATS

_FMT_OF = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

# On a GPU, a batch of more than this many tokens streams an FFN's cold rows to the device
# (page-locked, async) instead of computing them on the CPU: the CPU's batched cost grows with
# the tokens (compute-bound), the copy's does not (an expert's ~2-14 MB of cold q4_0 rows is
# 0.1-0.6 ms at PCIe 4 speed, about what 1-4 tokens cost on 8 CPU threads). The H100 profile of a
# 512-token prompt (8 layers, 24 GiB) had experts with 17-64 tokens spend 14 ms each on the CPU.
STREAM_ABOVE_CUDA = 4


@dataclass(frozen=True)
class RuntimeOptions:
    sparsity: str = "exact"        # dense | exact | predictor
    cpu_fmt: str = "auto"          # cold rows: auto (the checkpoint's float format) | f32 | f16 | bf16 | q8_0 | q4_0
    gpu_fmt: str = "auto"          # hot rows: auto (the compute dtype) | the same formats
    predictor_threshold: float = 0.0   # a neuron is predicted active when its score > this (loader: predictor_config.json)
    dense_above: int = 16          # batches of more tokens (prefill chunks) compute densely
    stream_above: int | None = -1  # batches of more tokens compute the cold rows on the device,
                                   # streamed there (-1: STREAM_ABOVE_CUDA on a GPU, never on the cpu device)

    def resolved_gpu_fmt(self, dtype: torch.dtype) -> str:
        return _FMT_OF[dtype] if self.gpu_fmt == "auto" else self.gpu_fmt

    def validate(self) -> "RuntimeOptions":
        if self.sparsity not in SPARSITY_MODES:
            raise HybridInferError(f"bad sparsity {self.sparsity!r}: use {', '.join(SPARSITY_MODES)}")
        if not math.isfinite(self.predictor_threshold):
            raise HybridInferError(f"the predictor threshold must be a finite number, got {self.predictor_threshold}")
        for name in ("cpu_fmt", "gpu_fmt"):
            v = getattr(self, name)
            if v != "auto" and v not in FORMATS:
                raise HybridInferError(f"bad {name} {v!r}: use auto, {', '.join(FORMATS)}")
        return self


def hot_key(layer: int, expert: int | None) -> tuple[int, int]:
    return (layer, -1 if expert is None else expert)


def split_rows(n_ff: int, hot_ids, warm_ids=(), what: str = "", freq=None) -> tuple[np.ndarray, np.ndarray, int]:
    """One FFN's neurons split by tier -> (hot_ids int64 [n_hot] sorted, cold_ids int64 [n_cold]:
    the warm ids first (sorted), then the other cold ids, n_warm). The cold PackedFFN's rows
    follow cold_ids, so its rows [0, n_warm) are the warm tier (read over PCIe by the GPU in
    decode). hot_ids / warm_ids: sorted, unique, in 0..n_ff-1 and disjoint (HybridInferError).
    freq: [n_ff] firing counts or frequencies (the profile's), or None. With it the other cold
    ids go in descending frequency (ties by id), else by id: a token's active cold rows then
    gather near the start of the rows instead of spreading over all of them, so the CPU reads
    fewer, longer runs (ffn_sparse 14336 x 4096 q4_0 at 15 %, 2 threads, rows drawn from the
    M7 curve: 38.8 -> 31.1 ms for 32 layers, benchmarks/results/cold_order_dev2core.txt)."""
    hot = np.asarray(hot_ids, dtype=np.int64).reshape(-1)
    warm = np.asarray(warm_ids, dtype=np.int64).reshape(-1)
    for name, ids in (("hot", hot), ("warm", warm)):
        if ids.size and (ids.min() < 0 or ids.max() >= n_ff or np.any(np.diff(ids) <= 0)):
            raise HybridInferError(f"placement: {name} ids{what} must be sorted, unique and in 0..{n_ff - 1}")
    tier = np.zeros(n_ff, np.int8)          # 0 cold, 1 hot, 2 warm
    tier[hot] = 1
    if np.any(tier[warm] == 1):
        raise HybridInferError(f"placement: warm ids{what} overlap the hot ones")
    tier[warm] = 2
    rest = np.flatnonzero(tier == 0)
    if freq is not None:
        f = np.asarray(freq, dtype=np.float64).reshape(-1)
        if f.shape != (n_ff,):
            raise HybridInferError(f"placement: {f.size} firing frequencies{what} for {n_ff} neurons")
        rest = rest[np.argsort(-f[rest], kind="stable")]
    return hot, np.concatenate([warm, rest]), int(warm.size)


def build_hybrid(cfg: ModelConfig, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                 hot: Mapping[tuple[int, int], np.ndarray], options: RuntimeOptions,
                 places: dict[str, bool] | None = None,
                 warm: Mapping[tuple[int, int], np.ndarray] | None = None,
                 freq: Mapping[tuple[int, int], object] | None = None) -> Transformer:
    """hot[(layer, expert or -1)] = sorted neuron ids kept on the GPU side (missing: none);
    warm[...] = sorted ids of the cold rows the GPU reads over PCIe in decode (split_rows: the
    cold rows' first ones; missing: none); freq[...] = [n_ff] firing counts (a NeuronProfile's
    counts): the other cold rows in descending frequency (split_rows; missing: by id)."""
    warm, freq = warm or {}, freq or {}
    options = options.validate()
    gpu_fmt = options.resolved_gpu_fmt(dtype)
    stream_above = options.stream_above
    if stream_above == -1:
        stream_above = STREAM_ABOVE_CUDA if device.type == "cuda" else None

    def factory(layer, expert, fetch, predictor):
        w1, w3, w2 = fetch("gate"), fetch("up"), fetch("down")
        n_ff = w1.shape[0]
        cpu_fmt = options.cpu_fmt if options.cpu_fmt != "auto" else _FMT_OF.get(w1.dtype, "f32")
        key = hot_key(layer, expert)
        hot_ids, cold_np, n_warm = split_rows(n_ff, hot.get(key, ()), warm.get(key, ()),
                                              f" of layer {layer} expert {expert}", freq.get(key))
        cold_ids = torch.from_numpy(cold_np)
        hot_ffn = HotFFN.build(w1, w3, w2, hot_ids, gpu_fmt, device) if hot_ids.size else None
        cold = None
        if cold_ids.numel():
            cold = PackedFFN.from_weights(w1[cold_ids], w3[cold_ids], w2[:, cold_ids], cpu_fmt)
        if predictor is not None:
            predictor.threshold = options.predictor_threshold
        elif options.sparsity == "predictor":
            raise HybridInferError(
                f"no predictor for layer {layer}{'' if expert is None else f' expert {expert}'}: use "
                "--sparsity exact, or train predictors with `hybridinfer train-predictors`")
        return HybridFFN(n_ff, hot_ffn, cold, cold_ids, cfg.activation, cfg.act_threshold,
                         options.sparsity, predictor, device, options.dense_above, stream_above,
                         n_warm=n_warm)

    # a quantised CPU format: the attention projections and lm_head the CPU holds are packed in
    # it too (the C++ kernels read them, as llama.cpp does), not left to torch's float matmul
    # and those on the GPU side in the hot rows' block format where a GEMV reads it (q4_0)
    linear_fmt = options.cpu_fmt if options.cpu_fmt in quant.BLOCK_FORMATS else None
    return build_model(cfg, ckpt, device, dtype, with_predictors=options.sparsity == "predictor",
                       ffn_factory=factory, moe_class=HybridMoE, places=places,
                       cpu_linear_fmt=linear_fmt, gpu_linear_fmt=footprint.linear_fmt(gpu_fmt))


def build_from_placement(cfg: ModelConfig, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                         placement, options: RuntimeOptions, profile=None) -> Transformer:
    """Build what a placement.Placement says: its hot rows, and embeddings / lm_head /
    predictors on the CPU where it keeps them off the GPU. The bytes the build put on the GPU
    side are checked against what the plan budgeted, component by component. profile: the
    NeuronProfile the plan came from (or None): the cold rows are stored in its frequency order."""
    from .placement import gpu_component_bytes
    from .profile import model_identity

    if placement.model_id != model_identity(cfg):
        raise HybridInferError(f"the placement is for {placement.model_id}, not {model_identity(cfg)}")
    if device.type == "cuda" and not placement.attention_on_gpu:
        raise HybridInferError(
            f"a VRAM budget of {placement.budget_bytes:,} B does not hold attention and the KV cache "
            "for the context; give a larger --vram-budget, a smaller --context, or --device cpu")
    if device.type == "cuda" and dtype.itemsize != 2:
        raise HybridInferError(f"on a GPU the hybrid runtime keeps dense weights in 2-byte floats "
                               f"(what the plan budgets), not {dtype}: use --dtype float16 or bfloat16")
    places = {"embeddings": placement.embeddings_on_gpu, "lm_head": placement.lm_head_on_gpu,
              "predictors": placement.predictors_on_gpu}
    if placement.fmt != options.resolved_gpu_fmt(dtype):
        raise HybridInferError(f"the placement budgets hot rows in {placement.fmt}, the runtime "
                               f"would store {options.resolved_gpu_fmt(dtype)}")
    freq = profile.counts if profile is not None else None
    model = build_hybrid(cfg, ckpt, device, dtype, placement.hot, options, places, warm=placement.warm,
                         freq=freq)
    model.placement = placement
    if device.type == "cuda":      # on the cpu device the "GPU side" shares the host's memory
        want = gpu_component_bytes(cfg, placement)
        for comp, got in model.device_bytes.items():
            if got > want.get(comp, 0):
                raise HybridInferError(f"internal: the build put {got:,} B of {comp} on the GPU, "
                                       f"the plan budgeted {want.get(comp, 0):,} B")
    return model
