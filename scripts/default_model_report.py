"""Measure the bundled default model and write benchmarks/results/default_model.json + the loss plot.

    python scripts/default_model_report.py --heldout .corpus/heldout.txt --train-summary .train_out/summary.json

Figures (CPU, this machine): activation sparsity per layer/expert and its skew (from the shipped
profile), held-out perplexity in five runtimes on the same tokens (dense; exact, predictor at the
calibrated threshold of predictor_config.json, predictor at threshold 0, and q4_0 through the
hybrid build with every neuron on the CPU kernels), exact-vs-dense logit difference, predictor
recall/precision, and sample generations.

    python scripts/default_model_report.py --update --runtimes dense,predictor,predictor_t0
re-measures only those runtimes' perplexity (and the calibration summary) into the existing JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybridinfer.build import RuntimeOptions, build_hybrid   # noqa: E402
from hybridinfer.checkpoint import Checkpoint                # noqa: E402
from hybridinfer.config import ModelConfig                   # noqa: E402
from hybridinfer.llm import LLM                              # noqa: E402
from hybridinfer.model import build_model                    # noqa: E402
from hybridinfer.predictor import CONFIG_FILE, read_predictor_config  # noqa: E402
from hybridinfer.profile import NeuronProfile, model_identity  # noqa: E402
from hybridinfer.tokenizer import Tokenizer                  # noqa: E402

PROMPTS = ["The list type", "A dictionary is", "To open a file,", "The for statement in Python"]


def skew(counts: torch.Tensor, share: float = 0.8) -> float:
    """Fraction of neurons that carry `share` of all firings (smaller = more skewed)."""
    c = counts.double().sort(descending=True).values
    total = float(c.sum())
    if total == 0:
        return 0.0
    k = int(torch.searchsorted(c.cumsum(0), share * total).item()) + 1
    return k / c.numel()


def sparsity_table(prof: NeuronProfile) -> dict:
    per, fired_all, reach_all, n_ff = {}, 0, 0, None
    for (layer, e), c in sorted(prof.counts.items()):
        n_ff = c.numel()
        reached = prof.reached(layer, e)
        per[f"{layer}.{e}"] = {"tokens": reached, "routed_share": reached / max(prof.tokens, 1),
                               "zeros": 1 - float(c.sum()) / max(reached * n_ff, 1), "skew80": skew(c)}
        fired_all += int(c.sum())
        reach_all += reached
    layers = {}
    for layer in sorted({int(k.split(".")[0]) for k in per}):
        rows = [v for k, v in per.items() if int(k.split(".")[0]) == layer]
        tok = sum(r["tokens"] for r in rows)
        layers[layer] = {"zeros": sum(r["zeros"] * r["tokens"] for r in rows) / max(tok, 1),
                         "skew80_mean": sum(r["skew80"] for r in rows) / len(rows),
                         "expert_share_min": min(r["routed_share"] for r in rows) / 2,
                         "expert_share_max": max(r["routed_share"] for r in rows) / 2}
    all_counts = torch.cat([c for _, c in sorted(prof.counts.items())])
    return {"zeros": 1 - fired_all / max(reach_all * n_ff, 1), "skew80_all_ffns": skew(all_counts),
            "skew80_mean": sum(v["skew80"] for v in per.values()) / len(per),
            "per_layer": layers, "per_ffn": per, "tokens": prof.tokens, "corpus": prof.corpus}


@torch.inference_mode()
def nll(llm: LLM, ids: list[int], window: int) -> tuple[float, int]:
    """Summed NLL of the tokens after the first of each window of `window` tokens, computed one
    token at a time (batch-1 decode: the path where predictor masks are per token, not a union)."""
    from hybridinfer.generate import decode_one_token

    total, n, model = 0.0, 0, llm.model
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window]
        if len(chunk) < 2:
            break
        cache = model.new_cache(len(chunk))
        for i in range(len(chunk) - 1):
            lp = torch.log_softmax(decode_one_token(model, chunk[i], cache).double().cpu(), dim=-1)
            total -= float(lp[chunk[i + 1]])
            n += 1
    return total, n


def calibrated_threshold(folder: Path) -> float:
    """What the loader uses: predictor_config.json in the model folder, else 0."""
    path = folder / CONFIG_FILE
    return float(read_predictor_config(path)["threshold"]) if path.is_file() else 0.0


def runtimes(folder: Path) -> dict:
    cfg = ModelConfig.from_dir(folder)
    tok = Tokenizer(folder)
    dev = torch.device("cpu")

    def dense():
        return LLM(build_model(cfg, Checkpoint(folder), dev, torch.float32, with_predictors=False), tok, folder)

    def hybrid(**opts):   # hot = {}: every neuron in the CPU kernels (the GPU side holds none)
        return LLM(build_hybrid(cfg, Checkpoint(folder), dev, torch.float32, {}, RuntimeOptions(**opts)), tok, folder)

    return {"dense": dense, "exact": lambda: hybrid(sparsity="exact"),
            "predictor": lambda: hybrid(sparsity="predictor", predictor_threshold=calibrated_threshold(folder)),
            "predictor_t0": lambda: hybrid(sparsity="predictor", predictor_threshold=0.0),
            "q4_0": lambda: hybrid(sparsity="exact", cpu_fmt="q4_0")}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "threads": torch.get_num_threads(), "gpu": None, "torch": torch.__version__, "commit": commit}


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in summary["runs"]:
        lab = f"{r['variant']}{' (shipped)' if r['variant'] == summary['picked'] else ''}"
        a.plot([x["step"] for x in r["log"]], [x["loss"] for x in r["log"]], lw=0.8, label=lab + " train")
        a.plot([e["step"] for e in r["evals"]], [e["loss"] for e in r["evals"]], "o-", ms=3, label=lab + " held-out")
        b.plot([x["step"] for x in r["log"]], [x["sparsity"] for x in r["log"]], lw=0.8, label=lab)
    a.set(xlabel="step", ylabel="cross-entropy (nats/token)", ylim=(1.5, 6), title="loss")
    b.set(xlabel="step", ylabel="share of dReLU activations = 0", title="activation sparsity (train batches)")
    b.axhline(0.8, color="gray", ls=":", lw=0.8)
    a.legend(fontsize=6)
    b.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "hybridinfer/data/default_model")
    ap.add_argument("--heldout", type=Path, default=ROOT / ".corpus/heldout.txt")
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored in every runtime")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--train-summary", type=Path, default=ROOT / ".train_out/summary.json")
    ap.add_argument("--predictor-report", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/default_model.json")
    ap.add_argument("--runtimes", default=None,
                    help="comma-separated subset of dense,exact,predictor,predictor_t0,q4_0 (default: all)")
    ap.add_argument("--update", action="store_true",
                    help="keep the existing --out JSON; re-measure only the perplexity of --runtimes "
                         "and the predictor calibration summary")
    args = ap.parse_args(argv)
    folder = args.model
    cfg = ModelConfig.from_dir(folder)
    makers = runtimes(folder)
    wanted = list(makers) if args.runtimes is None else args.runtimes.split(",")
    if not set(wanted) <= set(makers):
        ap.error(f"--runtimes: choose from {','.join(makers)}")
    if args.update:
        res = json.loads(args.out.read_text())
        res["machine"] = machine()
    else:
        res = {"model": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
               "model_id": model_identity(cfg), "machine": machine()}
        prof = NeuronProfile.load(folder / "profile.safetensors", expect_model_id=model_identity(cfg))
        res["sparsity"] = sparsity_table(prof)
    text = args.heldout.read_text(encoding="utf-8").replace("\n\f\n", "\n\n")
    tok = Tokenizer(folder)
    ids = tok.encode(text)[:args.tokens]
    res.setdefault("perplexity", {}).update(
        {"heldout": str(args.heldout.name), "tokens": len(ids), "window": args.window,
         "how": "token-by-token decode (batch 1), every neuron on the CPU kernels (hot = none)",
         "predictor_threshold": calibrated_threshold(folder), "predictor_t0_threshold": 0.0})
    if (folder / CONFIG_FILE).is_file():
        res["predictor_calibration"] = read_predictor_config(folder / CONFIG_FILE)
    ref = None
    need_ref = [n for n in wanted if n not in ("dense", "predictor", "predictor_t0")]
    if need_ref and "dense" not in wanted:
        wanted.insert(0, "dense")
    for name in sorted(wanted, key=list(makers).index):
        llm = makers[name]()
        t0 = time.time()
        total, n = nll(llm, ids, args.window)
        res["perplexity"][name] = math.exp(total / n)
        res["perplexity"][name + "_seconds"] = round(time.time() - t0, 1)
        if not name.startswith("predictor"):   # batched logits: a predictor's mask would be the union over tokens
            lg = llm.logits(ids[:256])
            if name == "dense":
                ref = lg
            else:
                res["perplexity"][name + "_max_abs_logit_diff_vs_dense"] = float((lg - ref).abs().max())
        print(name, res["perplexity"][name], flush=True)
        if name == "dense" and not args.update:
            res["samples"] = [{"prompt": p, "greedy": llm.generate(p, max_new_tokens=48, temperature=0)}
                              for p in PROMPTS]
    d = res["perplexity"]["dense"]
    res["perplexity"].update({k + "_vs_dense": res["perplexity"][k] / d - 1
                              for k in ("exact", "predictor", "predictor_t0", "q4_0") if k in res["perplexity"]})
    if args.predictor_report and args.predictor_report.is_file():
        sc = json.loads(args.predictor_report.read_text())
        res["predictors"] = sc
    if args.train_summary.is_file() and not args.update:
        s = json.loads(args.train_summary.read_text())
        pick = next(r for r in s["runs"] if r["variant"] == s["picked"])
        res["training"] = {"picked": s["picked"], "variants": s["variants"], "hparams": pick["hparams"],
                           "seconds": pick["seconds"], "device": pick["device"], "torch": pick["torch"],
                           "evals": pick["evals"]}
        png = args.out.with_name(args.out.stem + "_loss.png")
        plot(s, png)
        res["plot"] = png.name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    p = res["perplexity"]
    print(f"zeros {res['sparsity']['zeros']:.3f}  skew80 {res['sparsity']['skew80_mean']:.3f}  ppl "
          + " ".join(f"{k} {p[k]:.3f}" for k in makers if k in p))


if __name__ == "__main__":
    main()
