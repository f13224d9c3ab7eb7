"""From load options to a built model: resolve the folder, pick the runtime (dense reference or
hybrid), find the profile, plan (cached on disk by model, budget, profile and context), build.

Dense reference: sparsity "dense" with no budget -> every weight on the device.
Hybrid: everything else -> placement.plan() decides what lives on the GPU side; without a GPU
the GPU side is the cpu device and the budget is 0, so every FFN row runs in the CPU kernels.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import HybridInferError


@dataclass(frozen=True)
class LoadOptions:
    device: torch.device
    dtype: torch.dtype
    sparsity: str | None = None          # None: predictor when every FFN has one, else exact
    vram_budget: str | int | None = None  # None: "auto" on a GPU, 0 on the CPU
    context: int | None = None           # KV positions to budget (default: the planner's)
    profile: str | None = None           # a profile file (default: found next to the model, or none)
    cpu_fmt: str = "auto"
    gpu_fmt: str = "auto"
    plan_cache: bool = True
    predictors: str | None = None        # trained predictors (default: what train-predictors wrote, if any)
    predictor_threshold: float | None = None  # None: predictor_config.json beside the predictors, else 0.0
    cuda_graphs: bool = True             # batch-1 decode through CUDA graphs (on a GPU)
    pcie_share: float | str | None = None   # the plan's warm tier (placement.plan); None: auto on cuda, else 0


def default_sparsity(cfg: ModelConfig, ckpt: Checkpoint) -> str:
    from .predictor import predictor_names
    names = predictor_names(cfg).values()
    return "predictor" if all(a in ckpt and b in ckpt for a, b in names) else "exact"


def find_profile(cfg: ModelConfig, folder: Path, explicit: str | None):
    """A NeuronProfile for this model: explicit file, <model>/profile.safetensors, PowerInfer's
    <model>/activation/ counts, the user cache (what `hybridinfer profile` writes), or None."""
    from .profile import NeuronProfile, default_profile_path, model_identity

    mid = model_identity(cfg)
    if explicit:
        return NeuronProfile.load(explicit, expect_model_id=mid), str(explicit)
    for cand in (folder / "profile.safetensors", default_profile_path(cfg)):
        if cand.is_file():
            return NeuronProfile.load(cand, expect_model_id=mid), str(cand)
    if (folder / "activation").is_dir():
        return NeuronProfile.from_powerinfer(folder, cfg), str(folder / "activation")
    return None, "none (uniform frequencies)"


def _budget_bytes(spec, device: torch.device) -> int:
    from .budget import parse_budget

    if spec is None:
        spec = "auto" if device.type == "cuda" else "0"
    if isinstance(spec, int):
        return spec
    free = total = None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    return parse_budget(str(spec), free, total)


def predictor_source(cfg: ModelConfig, explicit: str | None) -> str | None:
    """Trained predictors to use instead of the checkpoint's: an explicit file/folder, or what
    `hybridinfer train-predictors` wrote for this model; None: the checkpoint's own."""
    from .predictor import PREDICTOR_FILE, default_predictor_dir

    if explicit is None and (default_predictor_dir(cfg) / PREDICTOR_FILE).is_file():
        return str(default_predictor_dir(cfg) / PREDICTOR_FILE)
    return explicit


def overlay_predictors(cfg: ModelConfig, ckpt: Checkpoint, explicit: str | None) -> str | None:
    """Trained predictors over the checkpoint's (predictor_source). Returns where they came from."""
    from .predictor import load_predictors

    src = predictor_source(cfg, explicit)
    if src is not None:
        ckpt.overlay(load_predictors(src, cfg))
    return src


def resolve_predictor_threshold(folder: Path, pred_src: str | None, explicit: float | None) -> tuple[float, str]:
    """The predictors' score threshold and where it came from: the explicit option, else the
    predictor_config.json beside the predictors in use (the model folder for the checkpoint's own,
    the trained predictors' folder for overlaid ones; `hybridinfer calibrate-predictors` writes
    it), else 0.0 (TurboSparse's rule)."""
    from .predictor import config_path, read_predictor_config

    if explicit is not None:
        return float(explicit), "option"
    path = config_path(folder, pred_src)
    if path.is_file():
        return float(read_predictor_config(path)["threshold"]), str(path)
    return 0.0, "default (0.0)"


def get_placement(cfg, ckpt, folder: Path, opts: LoadOptions, gpu_fmt: str):
    """(the placement for these options, from the on-disk cache when it was planned before; the
    profile it was planned from, or None)."""
    from .default_model import cache_root
    from .budget import check_pcie_share, default_pcie_share
    from .placement import Placement, plan
    from .predictor import budget_predictor_numel
    from .profile import model_identity

    budget = _budget_bytes(opts.vram_budget, opts.device)
    share = check_pcie_share(default_pcie_share(opts.device.type) if opts.pcie_share is None else opts.pcie_share)
    profile, profile_src = find_profile(cfg, folder, opts.profile)
    pn = budget_predictor_numel(cfg, ckpt) if opts.sparsity == "predictor" else 0
    src = Path(profile_src)
    stamp = f"{src.stat().st_size}:{src.stat().st_mtime_ns}" if src.exists() and src.is_file() else ""
    key = hashlib.sha256(json.dumps([model_identity(cfg), budget, profile_src, stamp, opts.context,
                                     gpu_fmt, pn, opts.sparsity, share]).encode()).hexdigest()[:24]
    path = cache_root() / "plans" / f"{key}.json"
    if opts.plan_cache and path.is_file():
        try:
            return Placement.load(path, expect_model_id=model_identity(cfg)), profile
        except HybridInferError:
            pass                                   # a stale or broken cache entry: plan again
    p = plan(cfg, profile, budget, context=opts.context, fmt=gpu_fmt, predictor_numel=pn, pcie_share=share)
    if opts.plan_cache:
        p.save(path)
    return p, profile


def build(folder: Path, opts: LoadOptions):
    """-> (ModelConfig, Transformer)."""
    from .build import RuntimeOptions, build_from_placement
    from .model import build_model

    cfg = ModelConfig.from_dir(folder)
    ckpt = Checkpoint(folder)
    pred_src = overlay_predictors(cfg, ckpt, opts.predictors)
    if opts.sparsity == "dense" and opts.vram_budget is None:
        return cfg, build_model(cfg, ckpt, opts.device, opts.dtype)
    sparsity = opts.sparsity or default_sparsity(cfg, ckpt)
    opts = replace(opts, sparsity=sparsity, predictors=pred_src)
    threshold, threshold_src = 0.0, "unused"
    if sparsity == "predictor":
        threshold, threshold_src = resolve_predictor_threshold(folder, pred_src, opts.predictor_threshold)
    ro = RuntimeOptions(sparsity=sparsity, cpu_fmt=opts.cpu_fmt, gpu_fmt=opts.gpu_fmt,
                        predictor_threshold=threshold).validate()
    gpu_fmt = ro.resolved_gpu_fmt(opts.dtype)
    placement, profile = get_placement(cfg, ckpt, folder, opts, gpu_fmt)
    if opts.device.type == "cuda" and not placement.attention_on_gpu:
        # The budget does not hold attention + the KV cache for the context: then nothing goes on
        # the GPU, and the KV cache, like everything else, lives in RAM (the CPU runs it all).
        import warnings
        warnings.warn(f"a VRAM budget of {placement.budget_bytes:,} B does not hold attention and the KV "
                      f"cache for {placement.context} positions: running on the CPU (give a larger "
                      "--vram-budget or a smaller --context to use the GPU)", stacklevel=2)
        cpu = torch.device("cpu")
        return build(folder, replace(opts, device=cpu, vram_budget=0))
    model = build_from_placement(cfg, ckpt, opts.device, opts.dtype, placement, ro, profile)
    model.predictor_threshold = (threshold, threshold_src)
    if opts.device.type == "cuda" and opts.cuda_graphs:
        from .graphs import GraphDecoder
        model.graph_decoder = GraphDecoder(model, placement.context)
    return cfg, model
