"""Device microbenchmark of the hot-half Triton kernels (one token): now
(hybridinfer/kernels/triton_ffn.py), optionally against an earlier version of that module
(--before FILE, both on the GPU q4_0 row layout), q4_0 and f16 rows, d = 4096, n_hot x mask
density, M47 sizes; then a sweep of each kernel's configs (q4_0), with the registers and spills of
each compiled variant.

    cd <repo> && git show e84314a:hybridinfer/kernels/triton_ffn.py > /tmp/triton_ffn_before.py
    PYTHONPATH=. python3 benchmarks/triton_hot_ffn.py --before /tmp/triton_ffn_before.py \
        --out benchmarks/results
(the recorded run compared with e84314a's kernels this way; the device has no git history, so
the file is made here and carried.)

What is timed: one call (gate_up + down, drelu, mask) as the device sees it: CUDA graphs of K calls
rotating over expert sets (> 300 MB in all, so L2 (50 MB) holds none of them), replayed, median
per call. Every active row fires (gate and up signs set per row), so the bytes that must be read
are active rows x 3 rows x row bytes; GB/s = those bytes / time, against a device-to-device copy
(bytes read + written) measured in the same run. Correctness first: float64 references.
Needs torch + triton + the package's Python only (no native extension).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from hybridinfer import quant
from hybridinfer.ffn import activate
from hybridinfer.kernels import triton_ffn as new
from hybridinfer.kernels.gpu import q4_rows_from_gpu, q4_rows_to_gpu

D = 4096
T0 = time.time()
SMOKE = "--smoke" in sys.argv   # TRITON_INTERPRET=1 on the CPU: checks the script, times nothing


def load_before(path: str | None):
    """The earlier triton_ffn module to compare with (--before), or None."""
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("triton_ffn_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


old = None                      # set by main() from --before


def copy_gbps(dev) -> float:
    if SMOKE:
        return 1.0
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    ts = []
    for _ in range(23):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    t = statistics.median(ts[3:])
    del src, dst
    return 2 * (1 << 30) / t / 1e9


def rows_f64(fmt, rows):
    """Stored rows (GPU row layout for q4_0) -> float64 [n, D] on the same device."""
    if fmt == "q4_0":
        return quant.unpack(q4_rows_from_gpu(rows), "q4_0", D).double()
    return rows.double()


def negate_rows(fmt, rows, neg):
    """Negate the rows where neg (bool [n]): q4_0 flips the sign of every scale (exact)."""
    if fmt == "q4_0":
        nb = D // 32
        s = rows[:, nb * 16:].view(torch.int16)
        s[neg] ^= torch.tensor(-32768, dtype=torch.int16, device=rows.device)
    else:
        rows[neg] = -rows[neg]


def make_set(fmt, n, density, dev, gen, fire_all=True):
    """One expert's hot rows: gate, up, down_t in the GPU row layout, x, mask."""
    def rows():
        if fmt == "q4_0":
            p = torch.randint(0, 256, (n, D // 32, 18), dtype=torch.uint8, device=dev, generator=gen)
            sc = (torch.rand(n, D // 32, device=dev, generator=gen) * 2e-3 + 1e-3).half()
            p[..., :2] = sc.view(torch.uint8).reshape(n, D // 32, 2)
            return q4_rows_to_gpu(p.reshape(n, -1))
        return (torch.randn(n, D, device=dev, generator=gen) * 0.02).half()
    g, u, w2 = rows(), rows(), rows()
    x = torch.randn(D, device=dev, generator=gen)
    mask = torch.rand(n, device=dev, generator=gen) < density
    if fire_all:   # every active row fires and has a != 0: all 3 rows of it must be read
        for w in (g, u):
            negate_rows(fmt, w, (rows_f64(fmt, w) @ x.double()) <= 0)
    return dict(g=g, u=u, d=w2, x=x, mask=mask)


def reference(fmt, s, act, thr=0.05):
    xd = s["x"].double()
    a = activate(rows_f64(fmt, s["g"]) @ xd, rows_f64(fmt, s["u"]) @ xd, act, thr)
    if s["mask"] is not None:
        a = a * s["mask"]
    return a @ rows_f64(fmt, s["d"])


def rel_err(y, ref):
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def call_new(fmt, s, act="drelu", cg=None, cd=None):
    a = new.gate_up(fmt, D, s["g"], s["u"], s["x"], act, 0.05, s["mask"], cfg=cg)
    return new.down(fmt, D, s["d"], a, cfg=cd)


def call_old(fmt, s, act="drelu"):
    return old.hot_ffn_one_token(fmt, D, s["g"], s["u"], s["d"], s["x"], act, 0.05, s["mask"])


def graph_time(fn, sets, calls=16, reps=15):
    """Median seconds per call of fn(set) over a CUDA graph of `calls` calls rotating over sets."""
    if SMOKE:                                          # --smoke: CPU interpreter, logic only
        t0 = time.time()
        y0 = fn(sets[0])
        return time.time() - t0, y0
    k = max(calls, len(sets))
    for s in sets[:2]:
        fn(s)                                          # compile / warm up outside the capture
    torch.cuda.synchronize()
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        fn(sets[0])
    torch.cuda.current_stream().wait_stream(st)
    torch.cuda.synchronize()
    gph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gph):
        outs = [fn(sets[i % len(sets)]) for i in range(k)]
    ts = []
    for r in range(reps + 3):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        gph.replay()
        e1.record()
        e1.synchronize()
        if r >= 3:
            ts.append(e0.elapsed_time(e1) / 1e3 / k)
    y0 = outs[0].clone()
    del gph, outs
    return statistics.median(ts), y0


def cfg_variants(fmt):
    """(gate_up cfg, down cfg) candidates swept per case (config() ships the best of these).
    q4_0 down: BK blocks of 32 columns per program (a column tile), R rows per tile."""
    if fmt == "q4_0":
        gu = [dict(CHUNK=c, R=r, BK=128, num_warps=w)
              for c, r, w in [(16, 2, 4), (8, 2, 4), (32, 2, 4), (16, 1, 4), (16, 4, 4), (32, 4, 8)]]
        gu.insert(1, dict(gu[0], WORDS=False))             # int16 halfwords (the odd-block path)
        dn = [dict(CHUNK=c, R=r, BK=bk, num_warps=w)
              for c, r, bk, w in [(256, 16, 8, 4), (128, 16, 8, 4), (64, 16, 8, 4), (512, 16, 8, 4),
                                  (512, 32, 4, 4), (256, 32, 8, 4), (256, 8, 16, 4), (512, 32, 8, 8)]]
        dn.insert(1, dict(dn[0], WORDS=False))
    else:
        gu = [dict(CHUNK=c, R=r, BK=bk, num_warps=w)
              for c, r, bk, w in [(16, 4, 4096, 8), (32, 4, 2048, 4)]]
        dn = [dict(CHUNK=c, R=r, BK=bk, num_warps=w)
              for c, r, bk, w in [(64, 8, 1024, 4), (64, 16, 1024, 4)]]
    return gu, dn


def compiled_info(kernel):
    """Registers / spills of the variant that ran last (triton_ffn.LAST holds the launch's
    CompiledKernel)."""
    k = new.LAST.get(kernel)
    try:
        return dict(n_regs=int(k.n_regs), n_spills=int(k.n_spills))
    except Exception:  # noqa: BLE001 - attribute names differ between triton versions
        return {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default=os.environ.get("HI_COMMIT", "?"))
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--sweep-budget-s", type=float, default=120.0,
                    help="the sweep runs first, while within this many seconds")
    ap.add_argument("--sweep-fmts", nargs="*", default=["q4_0", "f16"])
    ap.add_argument("--ns", type=int, nargs="+", default=[2048, 8192, 14336])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.6, 1.0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--before", default=None, metavar="FILE",
                    help="an earlier hybridinfer/kernels/triton_ffn.py to time against (e.g. from git show)")
    args = ap.parse_args()
    global old
    old = load_before(args.before)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if SMOKE else "cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    res = dict(machine=dict(gpu="smoke" if SMOKE else torch.cuda.get_device_name(),
                            torch=torch.__version__, triton=triton.__version__, commit=args.commit,
                            sms=0 if SMOKE else
                            torch.cuda.get_device_properties(0).multi_processor_count),
               d=D, act="drelu", cases=[], checks=[], sweeps=[], errors=[])

    def save():
        (out / "triton_hot_ffn_h100.json").write_text(json.dumps(res, indent=1))
        if "copy_gbps" in res:
            write_md(res, out / "triton_hot_ffn_h100.md")

    res["copy_gbps"] = copy_gbps(dev)
    print(f"copy {res['copy_gbps']:.0f} GB/s", flush=True)

    # ---- correctness: every activation, masks, both kernels, vs float64 ----
    for fmt in ["q4_0", "f16"]:
        s = make_set(fmt, 40 if SMOKE else 1000, 0.5, dev, gen, fire_all=False)
        for act in ["drelu", "relu", "fatrelu", "silu"]:
            for use_mask in (True, False):
                t = dict(s, mask=s["mask"] if use_mask else None)
                ref = reference(fmt, t, act)
                e_new = rel_err(call_new(fmt, t, act), ref)
                e_old = rel_err(call_old(fmt, t, act), ref) if old else float("nan")
                res["checks"].append(dict(fmt=fmt, act=act, mask=use_mask, err_new=e_new, err_old=e_old))
                print(f"check {fmt} {act} mask={use_mask}: new {e_new:.2e} old {e_old:.2e}", flush=True)
    save()

    # ---- config sweep (each kernel alone) on a few cases while its budget lasts ----
    for fmt in args.sweep_fmts:
        rb = quant.row_bytes(D, fmt)
        cases = [(14336, 1.0), (14336, 0.3), (14336, 0.6), (8192, 0.6), (8192, 1.0), (2048, 0.3),
                 (2048, 1.0)]
        for n, dens in ([(args.ns[0], 0.5)] if SMOKE else cases):
            if time.time() - T0 > args.sweep_budget_s or n not in args.ns:
                continue
            nsets = 2 if SMOKE else min(64, max(2, math.ceil(320e6 / (3 * n * rb))))
            sets = [make_set(fmt, n, dens, dev, gen) for _ in range(nsets)]
            active = statistics.mean(float(s["mask"].sum()) for s in sets)
            for s in sets:
                s["a"] = new.gate_up(fmt, D, s["g"], s["u"], s["x"], "drelu", 0.05, s["mask"])
            gus, dns = cfg_variants(fmt)
            for cg in gus:
                if time.time() - T0 > args.sweep_budget_s:
                    break
                try:
                    t, _ = graph_time(lambda s: new.gate_up(fmt, D, s["g"], s["u"], s["x"], "drelu",
                                                             0.05, s["mask"], cfg=cg), sets)
                    a = new.gate_up(fmt, D, sets[0]["g"], sets[0]["u"], sets[0]["x"], "drelu", 0.05,
                                    sets[0]["mask"], cfg=cg)
                    res["sweeps"].append(dict(kernel="gate_up", fmt=fmt, n_hot=n, density=dens,
                                              cfg=cg, t=t, gbps=2 * active * rb / t / 1e9,
                                              err=rel_err(a, sets[0]["a"].double()),
                                              **compiled_info("gate_up")))
                except Exception as e:  # noqa: BLE001
                    res["errors"].append(f"sweep gate_up {fmt} {cg}: {e!r}"[:1000])
            for cd in dns:
                if time.time() - T0 > args.sweep_budget_s:
                    break
                try:
                    t, y = graph_time(lambda s: new.down(fmt, D, s["d"], s["a"], cfg=cd), sets)
                    yr = sets[0]["a"].double() @ rows_f64(fmt, sets[0]["d"])
                    res["sweeps"].append(dict(kernel="down", fmt=fmt, n_hot=n, density=dens,
                                              cfg=cd, t=t, gbps=active * rb / t / 1e9,
                                              err=rel_err(y, yr), **compiled_info("down")))
                except Exception as e:  # noqa: BLE001
                    res["errors"].append(f"sweep down {fmt} {cd}: {e!r}"[:1000])
            save()
            best = {}
            for w in res["sweeps"]:
                if w["fmt"] == fmt and w["n_hot"] == n and w["density"] == dens:
                    k = w["kernel"]
                    if k not in best or w["gbps"] > best[k]["gbps"]:
                        best[k] = w
            for k, w in best.items():
                print(f"sweep {fmt} n={n} dens={dens} best {k}: {w['gbps']:.0f} GB/s {w['cfg']}"
                      f"  t={time.time() - T0:.0f}s", flush=True)
            del sets
            if not SMOKE:
                torch.cuda.empty_cache()

    # ---- before / after at the shipped configs ----
    for fmt in ["q4_0", "f16"]:
        rb = quant.row_bytes(D, fmt)
        for n in args.ns:
            for dens in args.densities:
                if time.time() - T0 > args.budget_s:
                    res["errors"].append(f"budget: skipped {fmt} {n} {dens}")
                    continue
                set_bytes = 3 * n * rb
                nsets = 2 if SMOKE else min(64, max(2, math.ceil(320e6 / set_bytes)))
                sets = [make_set(fmt, n, dens, dev, gen) for _ in range(nsets)]
                active = statistics.mean(float(s["mask"].sum()) for s in sets)
                need = 3 * active * rb
                ref = reference(fmt, sets[0], "drelu")
                row = dict(fmt=fmt, n_hot=n, density=dens, sets=nsets, active=active, bytes=need,
                           cfg=new.config(fmt, D, n, dev))
                try:
                    a = new.gate_up(fmt, D, sets[0]["g"], sets[0]["u"], sets[0]["x"], "drelu", 0.05,
                                    sets[0]["mask"])
                    row["nonzero_a"] = int((a != 0).sum())
                    t_new, y = graph_time(lambda s: call_new(fmt, s), sets)
                    row.update(t_new=t_new, gbps_new=need / t_new / 1e9, err_new=rel_err(y, ref))
                    ys = [call_new(fmt, sets[0]) for _ in range(5)]
                    row["rerun_spread"] = max(float((v - ys[0]).abs().max()) for v in ys)
                    t_gu, _ = graph_time(lambda s: new.gate_up(fmt, D, s["g"], s["u"], s["x"], "drelu",
                                                                0.05, s["mask"]), sets)
                    row.update(t_gate_up=t_gu, gbps_gate_up=2 * active * rb / t_gu / 1e9)
                    for s in sets:
                        s["a"] = new.gate_up(fmt, D, s["g"], s["u"], s["x"], "drelu", 0.05, s["mask"])
                    t_dn, _ = graph_time(lambda s: new.down(fmt, D, s["d"], s["a"]), sets)
                    row.update(t_down=t_dn, gbps_down=active * rb / t_dn / 1e9)
                except Exception as e:  # noqa: BLE001 - keep measuring the rest
                    res["errors"].append(f"new {fmt} {n} {dens}: {e!r}"[:2000])
                try:
                    if old is not None:
                        t_old, y = graph_time(lambda s: call_old(fmt, s), sets)
                        row.update(t_old=t_old, gbps_old=need / t_old / 1e9, err_old=rel_err(y, ref))
                except Exception as e:  # noqa: BLE001
                    res["errors"].append(f"old {fmt} {n} {dens}: {e!r}"[:2000])
                res["cases"].append(row)
                save()
                cp = res["copy_gbps"]
                print(f"{fmt} n={n} dens={dens}: {need / 1e6:.1f} MB  old {row.get('gbps_old', 0):.0f} GB/s"
                      f"  new {row.get('gbps_new', 0):.0f} GB/s ({row.get('gbps_new', 0) / cp:.2f} of copy)"
                      f"  gate_up {row.get('gbps_gate_up', 0):.0f}  down {row.get('gbps_down', 0):.0f}"
                      f"  err {row.get('err_new', -1):.1e}/{row.get('err_old', -1):.1e}"
                      f"  t={time.time() - T0:.0f}s", flush=True)

                del sets
                if not SMOKE:
                    torch.cuda.empty_cache()

    res["elapsed_s"] = time.time() - T0
    save()
    write_md(res, out / "triton_hot_ffn_h100.md")
    print((out / "triton_hot_ffn_h100.md").read_text())
    for e in res["errors"]:
        print("ERROR", e)


def write_md(res, path):
    cp = res["copy_gbps"]
    m = res["machine"]
    lines = [f"# Hot-half Triton kernels, one token (d = {res['d']}, drelu, every active row fires)",
             "", f"{m['gpu']}, torch {m['torch']}, triton {m['triton']}, commit {m['commit']}; "
             f"device copy {cp:.0f} GB/s (read + write). GB/s = active rows x 3 rows x row bytes / "
             "time per call (CUDA graph replays rotating over > 300 MB of expert sets).", "",
             "| fmt | n_hot | density | MB read | before us | before GB/s | after us | after GB/s |"
             " after / copy | speedup | gate_up GB/s | down GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["cases"]:
        if "t_new" not in r:
            lines.append(f"| {r['fmt']} | {r['n_hot']} | {r['density']} | failed: see JSON errors |")
            continue
        before = (f"{r['t_old'] * 1e6:.1f} | {r['gbps_old']:.0f}" if "t_old" in r else "- | -")
        speedup = f"{r['t_old'] / r['t_new']:.1f}x" if "t_old" in r else "-"
        lines.append(f"| {r['fmt']} | {r['n_hot']} | {r['density']} | {r['bytes'] / 1e6:.1f} | "
                     f"{before} | {r['t_new'] * 1e6:.1f} | "
                     f"{r['gbps_new']:.0f} | {r['gbps_new'] / cp:.2f} | {speedup} | "
                     f"{r['gbps_gate_up']:.0f} | {r['gbps_down']:.0f} |")
    lines += ["", "Correctness (max |y - ref| / max |ref|, float64 reference, n = 1000, half masked):", "",
              "| fmt | act | mask | after | before |", "|---|---|---|---|---|"]
    for c in res["checks"]:
        lines.append(f"| {c['fmt']} | {c['act']} | {c['mask']} | {c['err_new']:.1e} | {c['err_old']:.1e} |")
    if res["sweeps"]:
        lines += ["", "Config sweep (each kernel alone; GB/s of its own rows; (int16): q4_0 rows read as int16 "
                  "halfwords instead of int32 words; err: down vs float64, gate_up vs the shipped config):", "",
                  "| kernel | fmt | n_hot | density | CHUNK | R | BK | warps | GB/s | / copy | regs | spills | err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for w in res["sweeps"]:
            c = w["cfg"]
            lines.append(f"| {w['kernel']}{'' if c.get('WORDS', True) else ' (int16)'} | {w['fmt']} | "
                         f"{w['n_hot']} | {w['density']} | {c['CHUNK']} | "
                         f"{c['R']} | {c['BK']} | {c['num_warps']} | {w['gbps']:.0f} | {w['gbps'] / cp:.2f} | "
                         f"{w.get('n_regs', '?')} | {w.get('n_spills', '?')} | {w.get('err', -1):.1e} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
