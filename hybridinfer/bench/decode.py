"""`hybridinfer bench decode`: workloads M47 / M7 of BENCHMARKS.md, every policy in one run.

Synthesises the workload in memory (bench/workload.py), profiles it, plans each VRAM budget with
the real planner, builds each policy with the runtime's modules (bench/decode_policies.py),
measures decode tokens/s, the ms/token split, prefill, bytes per token and memory
(bench/decode_measure.py), the roofline's inputs in the same run, and optionally llama.cpp on the
same weights (--peer llama.cpp, bench/llamacpp_peer.py). Prints one table; JSON and a PNG plot.
docs/BENCH_DECODE.md explains every column and the honest limits of the synthetic workload.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

from ..atomic import write_json
from ..budget import check_pcie_share, default_pcie_share, parse_budget, pcie_share_arg
from . import machine
from .decode_measure import measure, roofline_inputs, rss_bytes, vram_cap
from .decode_policies import MARGIN, POLICIES, build, bytes_per_token, fixed_gpu_bytes
from .workload import SHAPES, make_workload, synthetic_profile

GIB = 1 << 30
# llama.cpp on the GPU machine (issue 6): M47 q4_0, CUDA build, 8 threads; decode tok/s
PEER_FIGURES = {"all-gpu": 199.5, "24GiB": 51.9, "16GiB": 14.3, "8GiB": 7.9, "cpu8": 4.86,
                "cpu16": 8.44, "prefill512_24GiB": 2862.0, "m7_cpu2": 4.29}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="M47", choices=tuple(SHAPES),
                        help="M47 / M7 (BENCHMARKS.md), T47 / T7 (tiny, for tests)")
    parser.add_argument("--layers", type=int, default=None,
                        help="run this many layers (scaled-down runs; budgets scale with the model)")
    parser.add_argument("--vram-budget", nargs="+", default=["24GiB", "16GiB", "8GiB"],
                        help="GPU budgets for hybrid and dense-offload (sizes as in `hybridinfer plan`)")
    parser.add_argument("--policies", nargs="+", default=None, choices=POLICIES,
                        help="default: all that apply (on a CPU-only machine: cpu-dense, cpu-sparse)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default min(8, CPUs))")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch's own CPU threads (default 1: every large CPU matrix goes through "
                             "the kernels' pool; torch's OpenMP workers spinning after small ops take "
                             "its cores)")
    parser.add_argument("--tokens", type=int, default=32, help="timed decode tokens per policy")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=512, help="prompt length for prefill (0: skip)")
    parser.add_argument("--prefill-only", nargs="+", default=None, metavar="POLICY[@BUDGET]",
                        help="measure prefill only for these (e.g. hybrid@24GiB gpu-dense); default all")
    parser.add_argument("--context", type=int, default=4096, help="KV positions budgeted and allocated")
    parser.add_argument("--pcie-share", type=pcie_share_arg, default=None,
                        help="share of each expert's expected cold activity the GPU reads over PCIe from "
                             "page-locked host rows (the hybrid policy's warm tier): 0..1 or auto (per "
                             "expert, balanced against the CPU's time); default auto on a CUDA device, 0 "
                             "elsewhere, where the CPU computes those rows like any cold row")
    parser.add_argument("--device", default=None, help="GPU side (default cuda when present, else cpu)")
    parser.add_argument("--dtype", default="bfloat16", help="attention/embeddings dtype on the device")
    parser.add_argument("--cpu-dtype", default="float32",
                        help="float dtype of a model wholly on the CPU (norms, embeddings, KV cache, "
                             "attention maths); its attention projections and lm_head are q4_0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="decode eagerly on the GPU (default: the runtime's CUDA-graph decoder)")
    parser.add_argument("--json", metavar="FILE", help="write figures + machine info here")
    parser.add_argument("--plot", metavar="FILE", help="PNG: tokens/s against VRAM budget")
    parser.add_argument("--peer", choices=["llama.cpp"], default=None,
                        help="also time llama.cpp on the same weights (GGUF, llama-cpp-python)")
    parser.add_argument("--peer-gpu-layers", type=int, nargs="+", default=[0],
                        help="llama.cpp -ngl values to time (default 0: CPU only)")
    parser.add_argument("--gguf-dir", default=None, help="where the peer's GGUF goes (default a temp dir)")


def _model_gpu_bytes(wl, context) -> int:
    return fixed_gpu_bytes(wl.cfg, context) + wl.expert_bytes + wl.predictor_bytes


def budget_scale(wl, context: int) -> float:
    """The factor a full model's VRAM budget takes for a workload of fewer layers: the scaled
    model's device bytes over the full model's (embeddings and lm_head do not scale)."""
    if wl.cfg.num_layers == wl.full_cfg.num_layers:
        return 1.0
    full = (fixed_gpu_bytes(wl.full_cfg, context)
            + (wl.expert_bytes + wl.predictor_bytes) * wl.full_cfg.num_layers // wl.cfg.num_layers)
    return _model_gpu_bytes(wl, context) / full


def _runs(args, wl, dev) -> tuple[list[tuple[str, int | None, str | None]], float]:
    """(policy, budget bytes) in order; budgets scaled for scaled-down models."""
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
    scale = budget_scale(wl, args.context)
    budgets = [(b, int(parse_budget(b) * scale)) for b in args.vram_budget]
    pol = args.policies or (POLICIES if dev.type == "cuda" else ("cpu-dense", "cpu-sparse"))
    out = []
    for name in ("gpu-sparse", "gpu-dense"):
        if name in pol:
            fits = free is None or _model_gpu_bytes(wl, args.context) + MARGIN < free
            if fits:
                out.append((name, None, None))
            else:
                print(f"{name}: skipped, the model does not fit the GPU", flush=True)
    out += [(n, None, None) for n in ("cpu-sparse", "cpu-dense") if n in pol]
    for label, b in budgets:
        for name in ("hybrid", "dense-offload"):
            if name in pol:
                out.append((name, b, label))
    return out, scale


def _roofline(row, rf, dev) -> float:
    """Seconds a token takes at least: the slowest of the CPU's reads, the GPU's and the warm
    rows' over PCIe (each at its measured bandwidth; they run concurrently), plus the syncs."""
    gbs = rf["gpu_copy_gbs"] if dev.type == "cuda" else rf["cpu_read_gbs"]
    t = max(row["bytes_cpu"] / (rf["cpu_read_gbs"] * 1e9), row["bytes_gpu"] / (gbs * 1e9),
            row.get("bytes_pcie", 0.0) / ((rf.get("pcie_gbs") or 1.0) * 1e9))
    return t + row["syncs_per_token"] * (rf["sync_s"] or 0.0)


def _one(name, budget, label, wl, profile, args, dev, dtype, cpu_dtype, rf) -> dict:
    row = {"policy": name, "budget": label, "budget_bytes": budget}
    t0 = time.perf_counter()
    with vram_cap(dev, budget) as mem:
        try:
            b = build(name, wl, dev, dtype, cpu_dtype, budget, profile, args.context, args.pcie_share)
            row["build_s"] = time.perf_counter() - t0
            row["note"] = b.note
            row["placement"] = b.placement
            row.update(gpu_layers=b.gpu_layers, hot_share=b.hot_share,
                       predictors_on_gpu=b.predictors_on_gpu)
            row["rss_after_build"] = rss_bytes()
            pf = args.prefill
            if args.prefill_only is not None and name not in args.prefill_only \
                    and f"{name}@{label}" not in args.prefill_only:
                pf = 0
            row.update(measure(b, args.warmup, args.tokens, pf, args.context, graphs=not args.no_cuda_graphs))
            bpt = bytes_per_token(b, wl, row["context_mean"], warm=row["warm_layers"] > 0)
            row["bytes_gpu"], row["bytes_cpu"], row["bytes_pcie"] = bpt["gpu"], bpt["cpu"], bpt["pcie"]
            row["roofline_ms"] = _roofline(row, rf, dev) * 1e3
            row["x_roofline"] = row["ms_token"] / row["roofline_ms"]
            row["rss"] = max(row["rss_after_build"], rss_bytes())
            del b
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of GPU memory under the budget: {str(e).splitlines()[0]}"
        except Exception as e:  # noqa: BLE001 - one policy's failure is a reported result
            import traceback
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    row.update(mem)
    return row


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'policy':<14}{'budget':>7}{'tok/s':>8}{'ms/tok':>8}{'gpu':>7}{'cpu':>7}{'sync':>7}"
            f"{'py':>7}{'py%':>5}{'xoffl':>7}{'roof':>7}{'xroof':>6}{'GB g/p/c':>16}{'VRAM':>6}"
            f"{'RSS':>6}{'pf t/s':>8}")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['policy']:<14}{r['budget'] or '':>7}  {r['error']}")
            continue
        s = r["split_ms"]
        lines.append(
            f"{r['policy']:<14}{r['budget'] or '':>7}{r['tok_s']:8.2f}{r['ms_token']:8.2f}"
            f"{s['gpu']:7.2f}{s['cpu']:7.2f}{s['sync']:7.2f}{s['python']:7.2f}"
            f"{100 * s['python'] / r['ms_token']:5.0f}{_fmt(r.get('x_dense_offload'), '7.2f')}"
            f"{r['roofline_ms']:7.2f}{r['x_roofline']:6.2f}"
            f" {r['bytes_gpu'] / 1e9:5.2f}/{r.get('bytes_pcie', 0) / 1e9:4.2f}/{r['bytes_cpu'] / 1e9:<5.2f}"
            f"{_fmt(r.get('peak_vram', 0) / GIB if r.get('peak_vram') else None, '6.1f')}"
            f"{r['rss'] / GIB:6.1f}{_fmt(r.get('prefill_tok_s'), '8.1f')}")
    return "\n".join(lines)


def plot(rows, path: str, title: str, peer: dict | None) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in rows if "error" not in r]
    for name, style in (("hybrid", "o-"), ("dense-offload", "s--")):
        pts = sorted((r["budget_bytes"] / GIB, r["tok_s"]) for r in ok if r["policy"] == name)
        if pts:
            ax.plot(*zip(*pts), style, label=name)
    for r in ok:
        if r["policy"] in ("cpu-dense", "cpu-sparse", "gpu-dense", "gpu-sparse"):
            ax.axhline(r["tok_s"], ls=":", lw=1, color="gray")
            ax.annotate(r["policy"], (0, r["tok_s"]), xycoords=("axes fraction", "data"), fontsize=7)
    if peer:
        pts = sorted((float(k[:-3]), v) for k, v in peer.items()
                     if k.endswith("GiB") and k[:-3].isdigit())
        if pts:
            ax.plot(*zip(*pts), "x:", color="black", label="llama.cpp (issue 6 figures)")
    ax.set_xlabel("VRAM budget (GiB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run(args: argparse.Namespace) -> int:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype, cpu_dtype = getattr(torch, args.dtype), getattr(torch, args.cpu_dtype)
    args.pcie_share = check_pcie_share(default_pcie_share(dev.type) if args.pcie_share is None
                                       else args.pcie_share)
    threads = args.threads or min(8, os.cpu_count() or 1)
    from ..kernels import cpu as cpu_k
    cpu_k.set_num_threads(threads)
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)              # the synthetic predictors' masks on cuda
    rf = roofline_inputs(threads, dev)
    torch.set_num_threads(args.torch_threads)      # after the probe, which sets both pools
    print(f"roofline inputs: CPU read {rf['cpu_read_gbs']:.1f} GB/s ({threads} threads), GPU copy "
          f"{_fmt(rf['gpu_copy_gbs'], '.0f')} GB/s, PCIe {_fmt(rf['pcie_gbs'], '.1f')} GB/s, "
          f"sync {_fmt((rf['sync_s'] or 0) * 1e6, '.1f')} us",
          flush=True)
    t = time.perf_counter()
    wl = make_workload(args.shape, args.layers, args.seed)
    prof = synthetic_profile(wl)
    print(f"workload {args.shape}: {wl.cfg.num_layers} layers, experts {wl.expert_bytes / GIB:.2f} GiB, "
          f"predictors {wl.predictor_bytes / GIB:.2f} GiB (q4_0), made in {time.perf_counter() - t:.1f} s; "
          f"profile sparsity {prof.sparsity():.3f}", flush=True)
    runs, scale = _runs(args, wl, dev)
    if scale != 1.0:
        print(f"scaled-down model: budgets x {scale:.4f}", flush=True)
    rows = []
    for name, budget, label in runs:
        r = _one(name, budget, label, wl, prof, args, dev, dtype, cpu_dtype, rf)
        rows.append(r)
        parts = " ".join(f"{k} {v:.1f}" for k, v in r.get("parts_ms", {}).items())
        print(f"{name} {label or ''}: " + (r.get("error") or f"{r['tok_s']:.2f} tok/s (ms/token: {parts})"),
              flush=True)
        if args.json:     # partial results survive a run cut short
            write_json(args.json + ".partial", {"policies": rows, "roofline_inputs": rf})
    by = {(r["policy"], r["budget"]): r for r in rows if "error" not in r}
    for r in rows:
        off = by.get(("dense-offload", r["budget"]))
        if r["policy"] == "hybrid" and off and "error" not in r:
            r["x_dense_offload"] = r["tok_s"] / off["tok_s"]
    peer = None
    if args.peer == "llama.cpp":
        from .llamacpp_peer import run_peer
        peer = run_peer(wl, threads, args, rows)
    title = (f"{args.shape} ({wl.cfg.num_layers} layers), q4_0, {threads} threads, "
             f"{machine.machine_info(threads)['gpu'] or 'no GPU'}")
    print("\n" + title)
    print(table(rows))
    if peer:
        for p in peer.get("rows", []):
            print(f"llama.cpp -ngl {p['n_gpu_layers']}: {p.get('tok_s', float('nan')):.2f} tok/s "
                  f"{p.get('error', '')}")
    if args.json:
        out = {"benchmark": f"decode {args.shape}", "command": " ".join(sys.argv),
               "machine": machine.machine_info(threads), "shape": args.shape,
               "layers": wl.cfg.num_layers, "full_layers": wl.full_cfg.num_layers,
               "budget_scale": scale, "device": str(dev), "dtype": args.dtype,
               "cpu_dtype": args.cpu_dtype, "threads": threads, "torch_threads": args.torch_threads,
               "tokens": args.tokens, "pcie_share": args.pcie_share,
               "context": args.context, "expert_bytes": wl.expert_bytes,
               "predictor_bytes": wl.predictor_bytes, "profile_sparsity": prof.sparsity(),
               "roofline_inputs": rf, "policies": rows, "peer": peer,
               "peer_reference_issue6": PEER_FIGURES, "table": table(rows)}
        write_json(args.json, out)
        if os.path.exists(args.json + ".partial"):
            os.remove(args.json + ".partial")
        print(f"wrote {args.json}")
    if args.plot and plot(rows, args.plot, title, PEER_FIGURES if args.shape == "M47" else None):
        print(f"wrote {args.plot}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
