"""Placement solver: (config, profile, VRAM budget) -> Placement, what lives on the GPU. Pure: no
torch.cuda, no weights; every byte count comes from footprint.py, as the runtime builder's do.

Objective (PowerInfer's): maximise the weight bytes read per token that are served from the GPU.
  - "core" = attention, norms, router + the KV cache for `context` positions: read every token
    (value per byte 1, the most any item has), so it goes first; when it does not fit, nothing
    goes on the GPU (the runtime then runs everything on the CPU).
  - lm_head (read every token), the embedding table (one row per token), predictors (each FFN's
    predictor is read whenever its FFN is reached): one yes/no item each.
  - FFN neurons: neuron i of FFN j is read with probability f_ij (profile.token_frequency: fire
    rate times the expert's routing rate), 3 rows (gate, up, down^T) each time. An FFN's hot set
    is a top-frequency prefix of its neurons. Neurons are grouped (consecutive in frequency order)
    so the MILP has <= ~4k group variables.
  - Warm tier (pcie_share > 0): after each FFN's hot prefix, the next neurons in frequency
    order until their frequency mass reaches pcie_share of the FFN's non-hot mass stay in the
    cold rows (page-locked host memory) but the GPU reads them over PCIe during decode; only
    their int32 ids take VRAM (footprint.warm_ids_bytes), reserved for every neuron up front.
  - Sync constraint (the paper's): an FFN gets no GPU neurons, or enough that the expected bytes
    they serve per token save at least one synchronisation: sync_s / (1/cpu_bw - 1/gpu_bw)
    = 10 us / (1/100 GB/s - 1/3 TB/s) ~ 1.03 MB per token by default, or the whole FFN.
MILP (scipy.optimize.milp, HiGHS): binary per item and per FFN "open", a continuous [0, 1] share
of each group; groups' values per byte fall within an FFN, so the optimum takes prefixes, and it
is rounded down to whole neurons. Greedy fallback: items by value per byte, the last one partial.
"""
from __future__ import annotations

import base64
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_text
from .budget import balanced_share, check_pcie_share
from .config import ModelConfig
from .errors import HybridInferError
from .footprint import (attention_bytes, dense_bytes, ffn_rows_bytes, kv_cache_bytes, linear_bytes, linear_fmt,
                        warm_ids_bytes)
from .profile import NeuronProfile, ffn_keys, model_identity
from .quant import row_bytes

SCHEMA_VERSION = 1
GPU_FORMATS = ("f16", "bf16", "q8_0", "q4_0", "f32")   # f32: the cpu device (tests, CPU-only runs)
DENSE_BYTES = 2            # attention, norms, router, predictors, embeddings, KV: f16/bf16 on the GPU
SYNC_S, GPU_BW, CPU_BW = 10e-6, 3e12, 100e9
MIN_ACTIVE_BYTES = int(SYNC_S / (1 / CPU_BW - 1 / GPU_BW))   # ~1.03 MB per token per FFN
UNIFORM_FIRE = 0.1         # with no profile: every neuron fires on 10% of the tokens reaching it
MAX_GROUPS = 4096          # group variables in the MILP at most (simplex pivots ~ groups taken)
def _encode_ids(ids: dict[tuple[int, int], np.ndarray]) -> dict[str, str]:
    return {f"{k[0]},{k[1]}": base64.b64encode(np.asarray(v, "<i4").tobytes()).decode()
            for k, v in sorted(ids.items())}


def _decode_ids(d: dict[str, str]) -> dict[tuple[int, int], np.ndarray]:
    out = {}
    for k, v in d.items():
        layer, e = (int(x) for x in k.split(","))
        out[(layer, e)] = np.frombuffer(base64.b64decode(v, validate=True), "<i4").astype(np.int32)
    return out


@dataclass(frozen=True)
class Placement:
    schema_version: int
    model_id: str
    budget_bytes: int
    gpu_bytes: int                       # everything the runtime allocates on the GPU (components sum)
    context: int                         # KV cache positions budgeted
    fmt: str                             # format of the hot FFN rows on the GPU
    attention_on_gpu: bool
    embeddings_on_gpu: bool
    lm_head_on_gpu: bool
    kv_on_gpu: bool
    predictors_on_gpu: bool
    hot: dict[tuple[int, int], np.ndarray]   # (layer, expert|-1) -> sorted unique int32 neuron ids
    predictor_numel: int = 0             # predictor parameters budgeted (all FFNs together)
    components: dict[str, int] = field(default_factory=dict)   # GPU bytes by component
    stats: dict[str, float] = field(default_factory=dict)      # expected bytes per token, shares
    solver: str = ""
    # (layer, expert|-1) -> sorted unique int32 ids of the warm neurons (disjoint from hot): rows
    # in page-locked host memory (the cold rows' first ones) the GPU reads over PCIe in decode
    warm: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def hot_count(self) -> int:
        return sum(len(v) for v in self.hot.values())

    def warm_count(self) -> int:
        return sum(len(v) for v in self.warm.values())

    def to_json(self) -> str:
        d = asdict(self)
        d["hot_encoding"] = "base64 of int32 little-endian neuron ids (hot and warm)"
        d["hot"], d["warm"] = _encode_ids(self.hot), _encode_ids(self.warm)
        return json.dumps(d, indent=1)

    def save(self, path: str | os.PathLike) -> Path:
        return write_text(path, self.to_json())

    @staticmethod
    def load(path: str | os.PathLike, expect_model_id: str | None = None) -> "Placement":
        path = Path(path)
        if not path.is_file():
            raise HybridInferError(f"placement {path} does not exist")
        try:
            d = json.loads(path.read_text())
            d.pop("hot_encoding", None)
            if d.get("schema_version") != SCHEMA_VERSION:
                raise HybridInferError(f"{path} has placement schema {d.get('schema_version')}; "
                                       f"this hybridinfer reads {SCHEMA_VERSION}")
            hot, warm = _decode_ids(d.pop("hot")), _decode_ids(d.pop("warm", {}))   # no "warm": older files
            p = Placement(**d, hot=hot, warm=warm)
        except HybridInferError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise HybridInferError(f"{path} is not a valid placement file") from None
        if expect_model_id is not None and p.model_id != expect_model_id:
            raise HybridInferError(f"placement {path} was made for another model ({p.model_id}), not {expect_model_id}")
        return p


# ---- bytes: one formula for planner and builder ------------------------------------------------

def fixed_bytes(cfg: ModelConfig, context: int, predictor_numel: int = 0,
                fmt: str | None = None) -> dict[str, int]:
    """GPU bytes of each all-or-nothing component; fmt: the hot rows' format, which sets the
    attention projections' and lm_head's (footprint.linear_fmt: q4_0 rows, else 2-byte floats)."""
    d, L = cfg.hidden_size, cfg.num_layers
    lf = linear_fmt(fmt) if fmt is not None else None
    attn = attention_bytes(cfg, lf, DENSE_BYTES)
    if cfg.attention_bias:
        attn += dense_bytes((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + d, DENSE_BYTES)
    return {"attention": L * attn,
            "norms": dense_bytes((2 * L + 1) * d, DENSE_BYTES),
            "router": dense_bytes(L * cfg.num_experts * d, DENSE_BYTES),
            "kv_cache": kv_cache_bytes(cfg, context, DENSE_BYTES),
            "embeddings": dense_bytes(cfg.vocab_size * d, DENSE_BYTES),
            "lm_head": 0 if cfg.tie_word_embeddings else linear_bytes(cfg.vocab_size, d, lf, DENSE_BYTES),
            "predictors": dense_bytes(predictor_numel, DENSE_BYTES)}


def gpu_component_bytes(cfg: ModelConfig, p: Placement) -> dict[str, int]:
    """What the runtime allocates on the GPU for placement p, by component (the builder's formula)."""
    f = fixed_bytes(cfg, p.context, p.predictor_numel, p.fmt)
    on = {"attention": p.attention_on_gpu, "norms": p.attention_on_gpu, "router": p.attention_on_gpu,
          "kv_cache": p.kv_on_gpu, "embeddings": p.embeddings_on_gpu, "lm_head": p.lm_head_on_gpu,
          "predictors": p.predictors_on_gpu}
    out = {k: (v if on[k] else 0) for k, v in f.items()}
    out["ffn_hot"] = sum(ffn_rows_bytes(len(v), cfg.hidden_size, p.fmt) for v in p.hot.values())
    out["ffn_warm_ids"] = warm_ids_bytes(p.warm_count())
    return out


# ---- the problem --------------------------------------------------------------------------------

@dataclass
class _Problem:
    keys: list[tuple[int, int]]
    order: list[np.ndarray]       # per FFN: neuron ids by falling frequency
    freq: list[np.ndarray]        # per FFN: token frequencies in that order (float64)
    kmin: np.ndarray              # per FFN: fewest neurons allowed when not 0
    nb: int                       # GPU bytes per hot neuron (rows + id)
    read: int                     # bytes read per firing neuron (3 rows)
    items: dict[str, tuple[int, float]]   # yes/no items: name -> (bytes, value per token)


def _route_share(cfg: ModelConfig) -> float:
    """The share of tokens an FFN is called on, on average: top-k / experts for an MoE, else 1."""
    return cfg.experts_per_token / cfg.num_experts if cfg.is_moe else 1.0


def _frequencies(cfg: ModelConfig, profile: NeuronProfile | None) -> list[np.ndarray]:
    keys = ffn_keys(cfg)
    if profile is None:
        share = _route_share(cfg)
        return [np.full(cfg.intermediate_size, UNIFORM_FIRE * share) for _ in keys]
    if profile.model_id != model_identity(cfg):
        raise HybridInferError(f"the profile was made for another model ({profile.model_id}), "
                               f"not {model_identity(cfg)}")
    return [profile.token_frequency(*k).double().numpy() for k in keys]


def _problem(cfg, profile, fmt, fixed, min_active_bytes) -> _Problem:
    d = cfg.hidden_size
    read = 3 * row_bytes(d, fmt)
    order, freq, kmin = [], [], []
    for f in _frequencies(cfg, profile):
        o = np.argsort(-f, kind="stable")
        fs = f[o]
        order.append(o.astype(np.int32))
        freq.append(fs)
        # smallest k whose prefix serves >= min_active_bytes per token
        k = int(np.argmax(np.cumsum(fs * read) >= min_active_bytes)) + 1 if min_active_bytes > 0 else 0
        if min_active_bytes > 0 and fs.sum() * read < min_active_bytes:
            k = len(fs)             # never worth a sync: all of it or nothing
        kmin.append(k)
    share = _route_share(cfg)
    d_bytes = DENSE_BYTES * d
    items = {"lm_head": (fixed["lm_head"], float(fixed["lm_head"])),
             "embeddings": (fixed["embeddings"], float(d_bytes + (fixed["embeddings"] if cfg.tie_word_embeddings else 0))),
             "predictors": (fixed["predictors"], fixed["predictors"] * share)}
    items = {k: v for k, v in items.items() if v[0] > 0}
    return _Problem(ffn_keys(cfg), order, freq, np.array(kmin), ffn_rows_bytes(1, d, fmt), read, items)


def _groups(pb: _Problem, group_size: int | None) -> int:
    n = sum(len(o) for o in pb.order)
    return group_size or max(1, math.ceil(n / MAX_GROUPS))


def _solve_milp(pb: _Problem, budget: int, group_size: int, time_limit: float):
    """-> (items taken, neurons per FFN) or None when HiGHS finds no solution in time.

    Variables: [yes/no items | z_j: FFN j's first kmin_j neurons (binary) | x_g: share of group g,
    the later neurons in chunks of group_size (continuous)], with x_g <= z_j. The block's value per
    byte is at least its later groups', so the LP relaxation is the fractional greedy and HiGHS
    only has to settle a few blocks."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    names = list(pb.items)
    blocks = [j for j in range(len(pb.keys)) if pb.kmin[j] > 0]
    zcol = {j: len(names) + i for i, j in enumerate(blocks)}
    g_ffn, g_size, g_val = [], [], []
    for j, fs in enumerate(pb.freq):
        for s in range(int(pb.kmin[j]), len(fs), group_size):
            g_ffn.append(j)
            g_size.append(min(group_size, len(fs) - s))
            g_val.append(fs[s:s + group_size].sum() * pb.read)
    ni, nz, G = len(names), len(blocks), len(g_ffn)
    gi = np.arange(G) + ni + nz
    c = -np.concatenate([[pb.items[k][1] for k in names],
                         [pb.freq[j][:pb.kmin[j]].sum() * pb.read for j in blocks], g_val])
    integ = np.concatenate([np.ones(ni + nz), np.zeros(G)])
    # row 0: bytes <= budget
    rows = [0] * (ni + nz + G)
    cols = list(range(ni + nz + G))
    vals = [pb.items[k][0] for k in names] + [int(pb.kmin[j]) * pb.nb for j in blocks] \
        + (np.array(g_size) * pb.nb).tolist()
    # rows 1..: x_g - z_j <= 0 for the groups of FFNs with a block
    r = 1
    for g, j in enumerate(g_ffn):
        if j in zcol:
            rows += [r, r]
            cols += [int(gi[g]), zcol[j]]
            vals += [1.0, -1.0]
            r += 1
    A = coo_matrix((np.array(vals, float), (np.array(rows), np.array(cols))), shape=(r, ni + nz + G)).tocsr()
    ub = np.concatenate([[budget], np.zeros(r - 1)])
    res = milp(c, integrality=integ, bounds=Bounds(0, 1), constraints=LinearConstraint(A, -np.inf, ub),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-4, "disp": False})
    if res.x is None:
        return None
    x = res.x
    taken = {k for i, k in enumerate(names) if x[i] > 0.5}
    share = np.zeros(len(pb.keys))
    np.add.at(share, np.array(g_ffn, dtype=np.int64), x[ni + nz:] * np.array(g_size))
    counts = np.floor(share + 1e-6).astype(np.int64)
    for j in blocks:
        counts[j] = counts[j] + pb.kmin[j] if x[zcol[j]] > 0.5 else 0
    return taken, counts


def _solve_greedy(pb: _Problem, budget: int, group_size: int):
    """Items by value per byte (an FFN's first item is its kmin prefix), the last one partial."""
    cand = [(-v / b, 0, i, k, 0, 0) for i, (k, (b, v)) in enumerate(pb.items.items())]
    for j, fs in enumerate(pb.freq):
        k0 = int(pb.kmin[j]) or min(group_size, len(fs))
        starts = [0] + list(range(k0, len(fs), group_size))
        for c, s in enumerate(starts):
            e = k0 if c == 0 else min(s + group_size, len(fs))
            cand.append((-fs[s:e].mean() * pb.read / pb.nb, 1, j, c, s, e))
    cand.sort(key=lambda t: (t[0], t[1], t[2], t[3]))
    left, taken = budget, set()
    counts = np.zeros(len(pb.keys), dtype=np.int64)
    closed = np.zeros(len(pb.keys), dtype=bool)
    for _, kind, j, c, s, e in cand:
        if kind == 0:
            b = pb.items[c][0]
            if b <= left:
                taken.add(c)
                left -= b
            continue
        if closed[j]:
            continue
        n = min(e - s, left // pb.nb)
        if c == 0 and n < e - s:
            n = 0                            # the first item is all-or-nothing (kmin)
        counts[j] += n
        left -= n * pb.nb
        if n < e - s:
            closed[j] = True
    return taken, counts


def _all_placed(pb: _Problem, taken: set, counts: np.ndarray) -> bool:
    """Every item and every FFN neuron with a non-zero frequency is on the GPU."""
    return len(taken) == len(pb.items) and all(
        counts[j] >= int(np.count_nonzero(fs)) for j, fs in enumerate(pb.freq))


def _objective(pb: _Problem, taken: set, counts: np.ndarray) -> float:
    """Bytes per token served from the GPU by the yes/no items and hot prefixes."""
    return (sum(pb.items[k][1] for k in taken)
            + sum(float(fs[:counts[j]].sum()) for j, fs in enumerate(pb.freq)) * pb.read)


def plan(cfg: ModelConfig, profile: NeuronProfile | None, budget_bytes: int, context: int | None = None,
         fmt: str = "f16", solver: str = "milp", predictor_numel: int = 0, group_size: int | None = None,
         min_active_bytes: int = MIN_ACTIVE_BYTES, time_limit: float = 8.0,
         pcie_share: float | str = 0.0) -> Placement:
    """The placement for a VRAM budget (bytes). profile None: uniform frequencies (UNIFORM_FIRE).
    pcie_share: share of each FFN's non-hot frequency mass made warm (_warm_counts); 0: none;
    "auto": per FFN, balanced_share of its expected non-hot bytes per call."""
    pcie_share = check_pcie_share(pcie_share)
    if budget_bytes < 0:
        raise HybridInferError(f"VRAM budget {budget_bytes} is negative")
    if fmt not in GPU_FORMATS:
        raise HybridInferError(f"GPU row format {fmt!r} is not one of {', '.join(GPU_FORMATS)}")
    try:
        row_bytes(cfg.hidden_size, fmt)
    except ValueError as e:
        raise HybridInferError(str(e)) from None
    if solver not in ("milp", "greedy"):
        raise HybridInferError(f"solver {solver!r}: use milp or greedy")
    context = min(4096, cfg.max_position_embeddings) if context is None else int(context)
    if not 0 < context <= cfg.max_position_embeddings:
        raise HybridInferError(f"context {context} is outside 1..{cfg.max_position_embeddings}")
    fixed = fixed_bytes(cfg, context, predictor_numel, fmt)
    pb = _problem(cfg, profile, fmt, fixed, min_active_bytes)
    core = fixed["attention"] + fixed["norms"] + fixed["router"] + fixed["kv_cache"]
    used = solver
    taken, counts = set(), np.zeros(len(pb.keys), dtype=np.int64)
    # warm ids for every neuron at worst, reserved before solving (the warm set follows the hot
    # one); a budget without room for them gets no warm tier
    reserve = warm_ids_bytes(sum(len(o) for o in pb.order)) if pcie_share != 0 else 0
    if core + reserve > budget_bytes:
        reserve, pcie_share = 0, 0.0
    if core <= budget_bytes:
        gs = _groups(pb, group_size)
        room = budget_bytes - core - reserve
        t0 = time.perf_counter()
        out = _solve_greedy(pb, room, gs)
        if solver == "milp" and _all_placed(pb, *out):
            used = "greedy (everything worth placing fits: optimal)"
        elif solver == "milp":   # keep the greedy answer when HiGHS runs out of time with a worse one
            left = max(1.0, time_limit - (time.perf_counter() - t0))
            m = _solve_milp(pb, room, gs, left)
            if m is None or _objective(pb, *m) < _objective(pb, *out) * (1 - 1e-9):
                used = "greedy (milp found no better solution in time)"
            else:
                out = m
        taken, counts = out
    on = core <= budget_bytes
    hot = {k: np.sort(pb.order[j][:counts[j]]).astype(np.int32) for j, k in enumerate(pb.keys)}
    route = _route_share(cfg)
    warm_n = _warm_counts(pb, counts, pcie_share, route)
    warm = {k: np.sort(pb.order[j][counts[j]:counts[j] + warm_n[j]]).astype(np.int32)
            for j, k in enumerate(pb.keys) if warm_n[j]}
    p = Placement(SCHEMA_VERSION, model_identity(cfg), int(budget_bytes), 0, context, fmt,
                  attention_on_gpu=on, embeddings_on_gpu="embeddings" in taken,
                  lm_head_on_gpu="lm_head" in taken or (cfg.tie_word_embeddings and "embeddings" in taken),
                  kv_on_gpu=on, predictors_on_gpu="predictors" in taken, hot=hot,
                  predictor_numel=int(predictor_numel), solver=used, warm=warm)
    comp = gpu_component_bytes(cfg, p)
    total = sum(comp.values())
    if total > budget_bytes:   # cannot happen by construction; never hand out a plan that overruns
        raise HybridInferError(f"internal: plan uses {total} B of a {budget_bytes} B budget")
    return _with_totals(p, comp, _stats(cfg, pb, fixed, p, counts, warm_n))


def _warm_counts(pb: _Problem, counts: np.ndarray, pcie_share: float | str,
                 route: float = 1.0) -> np.ndarray:
    """Per FFN, how many neurons after the hot prefix (frequency order) are warm: the smallest
    prefix of the rest whose frequency mass reaches the FFN's share of the rest's (0 when that
    is 0; share 1: all of the rest): pcie_share, or "auto": balanced_share of the rest's bytes
    per call (frequencies are per token; an expert is called on `route` of them, top-k /
    experts: the MoE's average)."""
    out = np.zeros(len(pb.keys), dtype=np.int64)
    if pcie_share == 0:
        return out
    for j, fs in enumerate(pb.freq):
        cum = np.cumsum(fs[counts[j]:])
        if cum.size:
            s = balanced_share(cum[-1] * pb.read / route) if pcie_share == "auto" else pcie_share
            if s >= 1:  # every non-hot row, also those the profile never saw fire: no CPU half
                out[j] = cum.size
            elif s > 0 and cum[-1] > 0:   # cum[-1] is the mass itself (not fs.sum())
                out[j] = min(cum.size, int(np.searchsorted(cum, s * cum[-1], side="left")) + 1)
    return out


def _with_totals(p: Placement, comp: dict[str, int], stats: dict[str, float]) -> Placement:
    from dataclasses import replace
    return replace(p, gpu_bytes=sum(comp.values()), components=comp, stats=stats)


def _stats(cfg, pb: _Problem, fixed, p: Placement, counts, warm_n) -> dict[str, float]:
    """Expected weight bytes read per token on each side (profile frequencies; KV reads excluded);
    the warm rows' reads (over PCIe, by the GPU) count on neither side but their own."""
    share = _route_share(cfg)
    core = fixed["attention"] + fixed["norms"] + fixed["router"]
    parts = [(core, p.attention_on_gpu), (fixed["lm_head"] or fixed["embeddings"], p.lm_head_on_gpu),
             (DENSE_BYTES * cfg.hidden_size, p.embeddings_on_gpu),
             (fixed["predictors"] * share, p.predictors_on_gpu)]
    gpu = sum(b for b, on in parts if on)
    cpu = sum(b for b, on in parts if not on)
    pcie = cpu_ffn = 0.0
    for j, fs in enumerate(pb.freq):
        g = float(fs[:counts[j]].sum()) * pb.read
        w = float(fs[counts[j]:counts[j] + warm_n[j]].sum()) * pb.read
        gpu += g
        pcie += w
        cpu_ffn += float(fs.sum()) * pb.read - g - w
    cpu += cpu_ffn
    ffn_all = sum(float(fs.sum()) for fs in pb.freq) * pb.read
    ffn_gpu = sum(float(fs[:counts[j]].sum()) for j, fs in enumerate(pb.freq)) * pb.read
    return {"gpu_bytes_per_token": gpu, "cpu_bytes_per_token": cpu, "pcie_bytes_per_token": pcie,
            "gpu_share_of_active_bytes": gpu / max(gpu + cpu + pcie, 1e-9),
            "ffn_gpu_share_of_active_bytes": ffn_gpu / max(ffn_all, 1e-9),
            "hot_neurons": float(sum(counts)), "ffns_with_hot_neurons": float((counts > 0).sum()),
            # the warm rows' share of the non-hot activity, all FFNs together
            "pcie_share": pcie / max(pcie + cpu_ffn, 1e-9), "warm_neurons": float(sum(warm_n)),
            "ffns_with_warm_neurons": float((np.asarray(warm_n) > 0).sum())}


def summary(p: Placement) -> str:
    """The table `hybridinfer plan` prints."""
    from .info import human_bytes

    lines = [f"model:   {p.model_id}", f"budget:  {human_bytes(p.budget_bytes)} ({p.budget_bytes:,} B); "
             f"context {p.context}; hot rows {p.fmt}; solver {p.solver}",
             f"{'GPU component':<16} {'bytes':>14} {'':>11}"]
    for k, v in p.components.items():
        lines.append(f"{k:<16} {v:>14,} {human_bytes(v):>11}")
    lines.append(f"{'total':<16} {p.gpu_bytes:>14,} {human_bytes(p.gpu_bytes):>11}")
    s = p.stats
    lines += [f"hot neurons:   {int(s['hot_neurons']):,} in {int(s['ffns_with_hot_neurons'])} of {len(p.hot)} FFNs",
              f"expected share of activated weight bytes on the GPU: {s['gpu_share_of_active_bytes']:.1%} "
              f"(FFN neurons alone: {s['ffn_gpu_share_of_active_bytes']:.1%})",
              f"expected bytes per token: GPU {human_bytes(s['gpu_bytes_per_token'])}, "
              f"CPU {human_bytes(s['cpu_bytes_per_token'])}"
              + (f", over PCIe {human_bytes(s['pcie_bytes_per_token'])}" if p.warm else "")]
    if p.warm:
        lines.append(f"warm neurons:  {p.warm_count():,} in {len(p.warm)} FFNs (host rows the GPU reads "
                     f"over PCIe: {s.get('pcie_share', 0):.0%} of the non-hot activity)")
    return "\n".join(lines)


def timed_plan(*args, **kw) -> tuple[Placement, float]:
    t = time.perf_counter()
    p = plan(*args, **kw)
    return p, time.perf_counter() - t
