"""`hybridinfer` command line: parses flags, calls the stages, prints. No logic of its own.

User mistakes (HybridInferError) print one line `error: ...` and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .errors import HybridInferError
from .budget import pcie_share_arg


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _pos_int(s: str) -> int:
    v = _nonneg_int(s)
    if v == 0:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _add_model_args(p: argparse.ArgumentParser, default_ok: bool = True) -> None:
    p.add_argument("--model", "-m", default=None, required=not default_ok,
                   help="model folder or known name (TurboSparse-Mixtral, TurboSparse-Mixtral-Instruct, "
                        "TurboSparse-Mistral-Instruct, ReluLLaMA-7B, ProSparse-Llama-2-7B, Bamboo-7B), "
                        "looked up in $HYBRIDINFER_MODELS and the Hugging Face cache"
                        + ("; default: the bundled default model" if default_ok else ""))


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="where the GPU part runs: cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--threads", type=_pos_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--dtype", default="auto",
                   help="compute dtype: auto (float32 on CPU, the checkpoint's on GPU), float32, float16, bfloat16")


_PCIE_HELP = ("share of each expert's expected cold activity the GPU reads over PCIe from page-locked "
              "host rows in decode (the plan's warm tier): 0..1, or auto (per expert, balancing the "
              "CPU's time against the PCIe reads'")


def _add_hybrid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", choices=("dense", "exact", "predictor"), default=None,
                   help="dense: every neuron; exact: lossless skipping of zero activations; predictor: "
                        "only neurons the predictor calls active (default: predictor when the model has "
                        "predictors, else exact)")
    p.add_argument("--vram-budget", default=None,
                   help="GPU memory for the model: 16GiB, 16000MB, 0, a share of free VRAM (0.8) or auto "
                        "(default: auto on a GPU, 0 on the CPU); the plan is cached on disk")
    p.add_argument("--context", type=_pos_int, default=None, help="KV-cache positions to budget (default 4096)")
    p.add_argument("--profile", default=None,
                   help="neuron profile file (default: next to the model or from `hybridinfer profile`)")
    p.add_argument("--predictors", default=None,
                   help="trained predictors (file or folder; default: what train-predictors wrote, if any)")
    p.add_argument("--predictor-threshold", type=float, default=None,
                   help="predictor score above which a neuron counts as active (lower: higher recall, more "
                        "neurons computed; default: predictor_config.json beside the predictors, written by "
                        "`hybridinfer calibrate-predictors`, else 0 = TurboSparse's rule)")
    p.add_argument("--weights", default="auto",
                   help="format of the FFN rows in RAM (CPU kernels): auto (the checkpoint's), f32, f16, bf16, q8_0, "
                        "q4_0; a quantised one also packs the attention and lm_head kept on the CPU (same format) "
                        "and CPU-resident predictors (q8_0) for the C++ kernels")
    p.add_argument("--gpu-weights", default="auto",
                   help="format of the hot FFN rows on the GPU: auto (the compute dtype), f16, bf16, q8_0, "
                        "q4_0; q4_0 also keeps the attention projections and lm_head on the GPU in q4_0 "
                        "(read by a Triton GEMV), as llama.cpp keeps a q4_0 model")
    p.add_argument("--pcie-share", type=pcie_share_arg, default=None,
                   help=_PCIE_HELP + "; default auto on a CUDA device, else 0)")


def _load(args, **over):
    from .llm import load

    opts = dict(device=args.device, dtype=args.dtype, threads=args.threads, sparsity=args.sparsity,
                vram_budget=args.vram_budget, context=args.context, profile=args.profile,
                weights=args.weights, gpu_weights=args.gpu_weights, predictors=args.predictors,
                predictor_threshold=args.predictor_threshold, pcie_share=args.pcie_share)
    opts.update(over)
    return load(args.model, **opts)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.n, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))


def cmd_run(args) -> int:
    if args.prompt is not None and not args.prompt.strip():
        raise HybridInferError("the prompt is empty")
    llm = _load(args)
    if args.chat:
        return _chat_loop(llm, _sampling(args))
    prompt = "Once upon a time" if args.prompt is None else args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise HybridInferError("the prompt read from stdin is empty")
    out = sys.stdout
    out.write(prompt)
    for piece in llm.stream(prompt, **_sampling(args)):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def _chat_loop(llm, sampling) -> int:
    messages = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = []
        for piece in llm.stream_chat(messages, **sampling):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args) -> int:
    from . import default_model, registry
    from .checkpoint import Checkpoint
    from .config import ModelConfig
    from .info import active_params, component_sizes, human_bytes

    folder = default_model.ensure() if args.model is None else registry.resolve(args.model)
    cfg = ModelConfig.from_dir(folder)
    sizes = component_sizes(Checkpoint(folder))
    total_p, total_b = sum(s.params for s in sizes), sum(s.bytes for s in sizes)
    print(f"model:         {folder}")
    print(f"architecture:  {cfg.architecture} ({cfg.family}), activation {cfg.activation}"
          + (f" (threshold {cfg.act_threshold})" if cfg.activation == "fatrelu" else ""))
    print(f"shape:         {cfg.num_layers} layers, hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}")
    if cfg.is_moe:
        print(f"experts:       {cfg.num_experts}, top-{cfg.experts_per_token}")
    print(f"parameters:    {total_p:,} ({human_bytes(total_b)}); "
          f"dense-active per token: {active_params(cfg, sizes):,}")
    print(f"{'component':<12} {'parameters':>16} {'bytes':>12}")
    for s in sizes:
        print(f"{s.name:<12} {s.params:>16,} {human_bytes(s.bytes):>12}")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    path = Path(args.text)
    if not path.is_file():
        raise HybridInferError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HybridInferError(f"{path} is not UTF-8 text") from None
    llm = _load(args)
    print(f"perplexity: {llm.perplexity(text, window=args.window):.4f}")
    return 0


def cmd_profile(args) -> int:
    from .llm import load
    from .profile import default_profile_path, profile_model, read_corpus

    name, texts = read_corpus(args.corpus)
    llm = load(args.model, device=args.device, dtype=args.dtype, threads=args.threads, sparsity="dense")
    prof = profile_model(llm, texts, args.tokens, progress=not args.quiet, corpus=name)
    out = prof.save(args.out or default_profile_path(llm.config))
    print(f"profiled {prof.tokens} tokens of {name}: {prof.sparsity():.1%} of FFN activations are zero; wrote {out}")
    return 0


def cmd_plan(args) -> int:
    import torch

    from . import default_model, registry
    from .checkpoint import Checkpoint
    from .config import ModelConfig
    from .loader import find_profile
    from .budget import parse_budget
    from .placement import plan, summary
    from .predictor import budget_predictor_numel

    folder = default_model.ensure() if args.model is None else registry.resolve(args.model)
    cfg = ModelConfig.from_dir(folder)
    prof, src = find_profile(cfg, folder, args.profile)
    free, total = torch.cuda.mem_get_info() if torch.cuda.is_available() else (None, None)
    pn = budget_predictor_numel(cfg, Checkpoint(folder), args.predictors)
    p = plan(cfg, prof, parse_budget(args.vram_budget, free, total), context=args.context, fmt=args.fmt,
             solver=args.solver, predictor_numel=pn, pcie_share=args.pcie_share)
    print(f"profile: {src}\n{summary(p)}")
    if args.out:
        print(f"wrote {p.save(args.out)}")
    return 0


def cmd_train_predictors(args) -> int:
    from .llm import load
    from .predictor import default_predictor_dir, save_predictors
    from .predictor_train import report_table, train_predictors
    from .profile import read_corpus

    name, texts = read_corpus(args.corpus)
    llm = load(args.model, device=args.device, dtype=args.dtype, threads=args.threads, sparsity="dense")
    tensors, scores = train_predictors(llm, texts, args.rank, max_tokens=args.tokens, steps=args.steps,
                                       progress=not args.quiet)
    print(report_table(scores))
    out = save_predictors(tensors, args.out or default_predictor_dir(llm.config), llm.config, name, args.rank, scores)
    print(f"wrote {out}")
    return 0


def cmd_calibrate_predictors(args) -> int:
    from .llm import load
    from .loader import predictor_source
    from .predictor import config_path, write_predictor_config
    from .predictor_train import calibrate_threshold, report_table
    from .profile import read_corpus

    name, texts = read_corpus(args.corpus)
    llm = load(args.model, device=args.device, dtype=args.dtype, threads=args.threads, sparsity="dense",
               predictors=args.predictors)
    t, rep = calibrate_threshold(llm, texts, args.target_recall, args.max_ratio, max_tokens=args.tokens,
                                 skip_tokens=args.skip_tokens, corpus=name)
    print(report_table(rep["per_ffn"]))
    z = rep["threshold_0"]
    print(f"threshold {t:g}: recall {rep['recall']:.3f}, precision {rep['precision']:.3f}, predicted/true "
          f"{rep['ratio']:.2f} (pooled over {rep['tokens']} tokens); at 0: recall {z['recall']:.3f}, "
          f"precision {z['precision']:.3f}, predicted/true {z['ratio']:.2f}")
    out = args.out or config_path(llm.folder, predictor_source(llm.config, args.predictors))
    print(f"wrote {write_predictor_config(out, rep)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridinfer",
                                description="Hybrid CPU-GPU inference for activation-sparse LLMs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="generate text (streams to stdout)",
                       description="Generate text from a prompt, or chat (--chat, one message a line).")
    _add_model_args(r)
    src = r.add_mutually_exclusive_group()
    src.add_argument("--prompt", "-p", default=None,
                     help="the prompt; '-' reads it from stdin (default: 'Once upon a time')")
    src.add_argument("--chat", action="store_true", help="chat on stdin with the model's chat template")
    r.add_argument("-n", "--max-new-tokens", dest="n", type=_nonneg_int, default=128,
                   help="tokens to generate at most (default 128)")
    r.add_argument("--temperature", "-t", type=float, default=0.7, help="0 = greedy (default 0.7)")
    r.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95; 1 = off)")
    r.add_argument("--top-k", type=_nonneg_int, default=0, help="sample from the k likeliest (default 0 = off)")
    r.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    r.add_argument("--stop", action="append", default=[], help="stop string (may repeat)")
    _add_runtime_args(r)
    _add_hybrid_args(r)
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("info", help="architecture, parameter counts, bytes per component",
                       description="Describe a model from its config.json and weight headers.")
    _add_model_args(i)
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("eval", help="perplexity of a text file",
                       description="Print `perplexity: <value>` of a UTF-8 text under the model.")
    _add_model_args(e)
    e.add_argument("--text", required=True, help="UTF-8 text file to score")
    e.add_argument("--window", type=_pos_int, default=None,
                   help="tokens per scoring window (default: the model's context length)")
    _add_runtime_args(e)
    _add_hybrid_args(e)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("profile", help="count how often each FFN neuron fires on calibration text",
                        description="Run the model densely over text and write a neuron profile (safetensors).")
    _add_model_args(pr)
    pr.add_argument("--corpus", default=None, help="a UTF-8 file or a folder of .txt/.md (default: the shipped corpus)")
    pr.add_argument("--tokens", type=_pos_int, default=32768, help="tokens to run at most (default 32768)")
    pr.add_argument("--out", default=None, help="profile file to write (default: the user cache, where run finds it)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_runtime_args(pr)
    pr.set_defaults(func=cmd_profile)

    pl = sub.add_parser("plan", help="decide what lives on the GPU for a VRAM budget",
                        description="Solve the placement (hot neurons, attention, KV cache, ...) and print it.")
    _add_model_args(pl)
    pl.add_argument("--vram-budget", required=True,
                    help="16GiB, 16000MB, 300KiB, bytes, 0 (nothing), 0.8 (share of free VRAM) or auto")
    pl.add_argument("--profile", default=None, help="profile file (default: the one `profile` wrote, or uniform)")
    pl.add_argument("--predictors", default=None, help="predictor file/folder to budget instead of the model's own")
    pl.add_argument("--context", type=_pos_int, default=None, help="KV cache positions (default min(4096, max))")
    pl.add_argument("--fmt", default="f16", help="format of hot FFN rows on the GPU: f16, bf16, q8_0, q4_0")
    pl.add_argument("--solver", default="milp", choices=["milp", "greedy"], help="default milp")
    pl.add_argument("--pcie-share", type=pcie_share_arg, default=0.0, help=_PCIE_HELP + "; default 0)")
    pl.add_argument("--out", default=None, help="write the placement as JSON")
    pl.set_defaults(func=cmd_plan)

    tp = sub.add_parser("train-predictors", help="train low-rank activation predictors on calibration text",
                        description="Train fc1 -> ReLU -> fc2 predictors per FFN; report held-out recall/precision.")
    _add_model_args(tp)
    tp.add_argument("--corpus", default=None, help="a UTF-8 file or a folder of .txt/.md (default: the shipped corpus)")
    tp.add_argument("--rank", type=_pos_int, default=64, help="predictor rank (default 64)")
    tp.add_argument("--tokens", type=_pos_int, default=16384, help="tokens to record at most (default 16384)")
    tp.add_argument("--steps", type=_pos_int, default=300, help="Adam steps per FFN (default 300)")
    tp.add_argument("--out", default=None, help="folder for predictors.safetensors (default: the user cache)")
    tp.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_runtime_args(tp)
    tp.set_defaults(func=cmd_train_predictors)

    cp = sub.add_parser("calibrate-predictors", help="pick the predictor score threshold for a recall target",
                        description="Run the model densely over held-out text and write predictor_config.json: "
                                    "the largest score threshold whose recall (pooled over every FFN) meets "
                                    "--target-recall with predicted <= --max-ratio x true active. The loader "
                                    "uses it by default (--predictor-threshold overrides).")
    _add_model_args(cp)
    cp.add_argument("--predictors", default=None,
                    help="trained predictors to calibrate (default: the ones the runtime would use)")
    cp.add_argument("--corpus", default=None,
                    help="held-out UTF-8 file or folder of .txt/.md, ideally not the predictors' training text "
                         "(default: the shipped corpus)")
    cp.add_argument("--tokens", type=_pos_int, default=16384, help="tokens to run at most (default 16384)")
    cp.add_argument("--skip-tokens", type=_nonneg_int, default=0,
                    help="skip the corpus' first N tokens, e.g. those an evaluation scores (default 0)")
    cp.add_argument("--target-recall", type=float, default=0.95, help="recall to reach (default 0.95)")
    cp.add_argument("--max-ratio", type=float, default=2.0,
                    help="most predicted-active per truly active neuron allowed (default 2.0)")
    cp.add_argument("--out", default=None,
                    help="file to write (default: predictor_config.json beside the predictors: the model "
                         "folder for the checkpoint's own, else the trained predictors' folder)")
    _add_runtime_args(cp)
    cp.set_defaults(func=cmd_calibrate_predictors)

    b = sub.add_parser("bench", help="benchmarks (see shared BENCHMARKS.md)",
                       description="Benchmarks; each prints a table and can write JSON.")
    bsub = b.add_subparsers(dest="bench", metavar="WHAT", required=True)
    try:
        from .bench import kernels as bench_kernels
    except ImportError:  # the native kernels are not built: say so when asked
        bench_kernels = None
    if bench_kernels is not None:
        k = bsub.add_parser("kernels", help="CPU sparse FFN kernels vs the read bandwidth (workload K)",
                            description="CPU sparse FFN kernels vs the machine's read bandwidth.")
        bench_kernels.configure(k)
        k.set_defaults(func=bench_kernels.run)
    try:
        from .bench import decode as bench_decode
    except ImportError:  # the native kernels are not built
        bench_decode = None
    if bench_decode is not None:
        dd = bsub.add_parser("decode", help="decode at M47/M7 scale: hybrid vs the peers (workloads M47, M7)",
                             description="Decode tokens/s of every policy on a synthetic M47/M7 model.")
        bench_decode.configure(dd)
        dd.set_defaults(func=bench_decode.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HybridInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
