"""Train hybridinfer's bundled default model: a small decoder in TurboSparse-Mixtral's exact layout
(MoE of dReLU experts, top-2 of 8) on the Python 3.11 documentation, with the project's own model
code (hybridinfer.model.build_model over nn.Parameters).

    python scripts/default_model_corpus.py --out .corpus                 # the text (apt-get, CPU)
    python scripts/train_default_model.py prepare --corpus .corpus --out .train_in   # tokenizer + ids
    python scripts/train_default_model.py train --data .train_in --out .train_out    # GPU, minutes
    python scripts/train_default_model.py train ... --steps 3 --batch 2 --device cpu # smoke test
    hybridinfer profile -m STAGE ... ; hybridinfer train-predictors -m STAGE ...     # CPU, minutes
    python scripts/train_default_model.py package --weights .train_out/model ...     # the shipped folder

`train` runs several variants (--variants, side by side as processes on one GPU) and keeps the one
with the lowest held-out perplexity among those whose dReLU sparsity reaches --min-sparsity.
Everything is seeded; `prepare` output is byte-identical run to run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# the repo's hybridinfer (no _C needed), or a snapshot of it named by $HYBRIDINFER_SRC
sys.path.insert(0, os.environ.get("HYBRIDINFER_SRC") or str(Path(__file__).resolve().parents[1]))

from hybridinfer.checkpoint import ffn_names, layer_prefix, router_name   # noqa: E402
from hybridinfer.config import ModelConfig                                 # noqa: E402
from hybridinfer.errors import HybridInferError                            # noqa: E402
from hybridinfer.model import build_model                                  # noqa: E402
from hybridinfer.synth import config_dict                                  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"]   # ids 0..4, as default_model.py
BOS, EOS = 1, 2
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MODEL = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=512, rope_theta=10000.0, torch_dtype="bfloat16",
             bos_token_id=BOS, eos_token_id=EOS)
# name -> overrides of the train defaults; `train` runs the ones named in --variants
VARIANTS = {
    "l1": dict(target_sparsity=0.88),
    "plain": dict(target_sparsity=0.0),
    "l1-long": dict(target_sparsity=0.88, steps=4000),
}


# ---- prepare: tokenizer + token ids (CPU) -----------------------------------------------------

def chat_text(q: str, a: str) -> str:
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"


def prepare(corpus: Path, out: Path, vocab: int, chat_repeats: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    train_docs = (corpus / "train.txt").read_text(encoding="utf-8").split("\n\f\n")
    held_docs = (corpus / "heldout.txt").read_text(encoding="utf-8").split("\n\f\n")
    chats = [json.loads(line) for line in (corpus / "chat.jsonl").read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_docs, trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<unk>",
               "add_bos_token": True, "add_eos_token": False, "model_max_length": MODEL["max_position_embeddings"],
               "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")

    def stream(docs: list[str]) -> np.ndarray:
        ids = []
        for enc in tok.encode_batch(docs, add_special_tokens=False):
            ids += [BOS] + enc.ids + [EOS]
        return np.asarray(ids, dtype=np.uint16)

    chat_docs = [chat_text(c["q"], c["a"]) for c in chats] * chat_repeats
    train = np.concatenate([stream(train_docs), stream(chat_docs)])
    held = stream(held_docs)
    train.tofile(out / "train.u16")
    held.tofile(out / "heldout.u16")
    cfg = config_dict("TurboSparseMixtralForCausalLM", **MODEL)
    cfg["vocab_size"] = tok.get_vocab_size()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    info = {"vocab": tok.get_vocab_size(), "train_tokens": int(train.size), "heldout_tokens": int(held.size),
            "train_docs": len(train_docs), "chat_docs": len(chat_docs), "heldout_docs": len(held_docs),
            "bytes_per_token": round(sum(map(len, train_docs)) / max(1, train.size), 3)}
    (out / "data.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


# ---- the model: the project's own Transformer over trainable parameters ----------------------

class ParamCheckpoint:
    """The Checkpoint interface build_model reads (get/names/contains/shape/release), over a dict
    of nn.Parameters already on the training device in float32, so build_model keeps them as they
    are (`.to()` returns the same object) and the Transformer it builds is differentiable."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params, self.folder = params, Path("<parameters>")

    def names(self) -> set[str]:
        return set(self.params)

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.params[name].shape)

    def release(self, name: str) -> None:
        pass

    def get(self, name: str, shape=None) -> torch.Tensor:
        t = self.params[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise HybridInferError(f"{name}: {list(t.shape)} != {list(shape)}")
        return t


def init_params(cfg: ModelConfig, seed: int, device) -> dict[str, torch.nn.Parameter]:
    """GPT-2 style: N(0, 0.02), residual outputs (o_proj, w2) scaled by 1/sqrt(2 layers), norms 1."""
    g = torch.Generator().manual_seed(seed)
    d, ff, hd, L = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    out_std = 0.02 / math.sqrt(2 * L)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    t = {"model.embed_tokens.weight": rnd(cfg.vocab_size, d), "model.norm.weight": torch.ones(d),
         "lm_head.weight": rnd(cfg.vocab_size, d)}
    for i in range(L):
        p = layer_prefix(i)
        t[p + "input_layernorm.weight"] = torch.ones(d)
        t[p + "post_attention_layernorm.weight"] = torch.ones(d)
        t[p + "self_attn.q_proj.weight"] = rnd(cfg.num_heads * hd, d)
        t[p + "self_attn.k_proj.weight"] = rnd(cfg.num_kv_heads * hd, d)
        t[p + "self_attn.v_proj.weight"] = rnd(cfg.num_kv_heads * hd, d)
        t[p + "self_attn.o_proj.weight"] = rnd(d, cfg.num_heads * hd, std=out_std)
        t[router_name(i)] = rnd(cfg.num_experts, d)
        for e in range(cfg.num_experts):
            n = ffn_names(cfg.family, i, e)
            t[n["gate"]], t[n["up"]] = rnd(ff, d), rnd(ff, d)
            t[n["down"]] = rnd(d, ff, std=out_std)
    return {k: torch.nn.Parameter(v.to(device)) for k, v in t.items()}


class Taps:
    """Router probabilities and FFN activations of the last forward, for the auxiliary losses.
    Wraps MoE.route and DenseFFN.activations per instance (model.py is untouched)."""

    def __init__(self, model):
        self.route_probs: list[torch.Tensor] = []     # per layer: [n, E] float32
        self.route_ids: list[torch.Tensor] = []       # per layer: [n, k]
        self.acts: list[torch.Tensor] = []            # per expert call: [n_routed, ff]
        for blk in model.blocks:
            moe = blk.ffn
            orig_route = moe.route

            def route(x, _moe=moe, _orig=orig_route):
                w, ids = _orig(x)
                self.route_probs.append(torch.softmax(F.linear(x, _moe.router).float(), dim=-1))
                self.route_ids.append(ids)
                return w, ids
            moe.route = route
            for ex in moe.experts:
                orig_act = ex.activations

                def acts(x, _orig=orig_act):
                    a = _orig(x)
                    self.acts.append(a)
                    return a
                ex.activations = acts

    def clear(self) -> None:
        self.route_probs, self.route_ids, self.acts = [], [], []

    def balance_loss(self, n_experts: int) -> torch.Tensor:
        """Switch/Mixtral load balancing: E * sum_e (share of top-k slots to e) * (mean prob of e)."""
        total = 0.0
        for p, ids in zip(self.route_probs, self.route_ids):
            share = F.one_hot(ids, n_experts).float().mean(dim=(0, 1))
            total = total + n_experts * (share * p.mean(0)).sum()
        return total / max(len(self.route_probs), 1)

    def l1(self) -> torch.Tensor:
        """Mean over FFN calls of sum_neurons mean_tokens |a| (ProSparse-style L1 on activations)."""
        return sum(a.float().abs().sum(-1).mean() for a in self.acts) / max(len(self.acts), 1)

    def sparsity(self) -> float:
        zeros = sum(int((a == 0).sum()) for a in self.acts)
        return zeros / max(sum(a.numel() for a in self.acts), 1)


# ---- training -----------------------------------------------------------------------------------

def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator, device):
    """Random windows of seq+1 tokens -> (x [b, seq], y [b, seq]) int64."""
    while True:
        starts = rng.integers(0, data.size - seq - 1, size=batch)
        w = torch.from_numpy(np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64)).to(device)
        yield w[:, :-1], w[:, 1:]


def forward_loss(model, x, y, autocast_dtype) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        cache = model.new_cache(x.shape[1], batch=x.shape[0])
        logits = model(x, cache)                                     # [b, t, V] float32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model, taps, data: np.ndarray, seq: int, batch: int, max_windows: int, device, ac) -> dict:
    """Held-out cross-entropy over contiguous windows, and the dReLU sparsity on them."""
    n = min((data.size - 1) // seq, max_windows)
    nll, cnt, zeros, total = 0.0, 0, 0, 0
    for s in range(0, n, batch):
        idx = range(s, min(n, s + batch))
        w = torch.from_numpy(np.stack([data[i * seq:i * seq + seq + 1] for i in idx]).astype(np.int64)).to(device)
        taps.clear()
        loss = forward_loss(model, w[:, :-1], w[:, 1:], ac)
        nll += float(loss) * w[:, 1:].numel()
        cnt += w[:, 1:].numel()
        zeros += sum(int((a == 0).sum()) for a in taps.acts)
        total += sum(a.numel() for a in taps.acts)
    taps.clear()
    return {"loss": nll / cnt, "ppl": math.exp(nll / cnt), "sparsity": zeros / max(total, 1)}


def train_one(args, name: str, out: Path) -> dict:
    hp = dict(steps=args.steps, target_sparsity=0.88)
    hp.update(VARIANTS.get(name, {}))
    if args.steps != 2000:                                  # an explicit --steps wins (smoke tests)
        hp["steps"] = args.steps
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    ac = torch.bfloat16 if device.type == "cuda" else None
    cfg_d = json.loads((args.data / "config.json").read_text())
    cfg = ModelConfig.from_dict(cfg_d)
    params = init_params(cfg, args.seed, device)
    model = build_model(cfg, ParamCheckpoint(params), device, torch.float32, with_predictors=False)
    own = {id(p) for p in model.parameters()}
    assert own == {id(p) for p in params.values()}, "build_model copied a parameter: not trainable"
    taps = Taps(model)
    train = np.fromfile(args.data / "train.u16", dtype=np.uint16)
    held = np.fromfile(args.data / "heldout.u16", dtype=np.uint16)
    decay = [p for k, p in params.items() if p.dim() == 2]
    no_decay = [p for k, p in params.items() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    steps, warm = hp["steps"], max(1, min(100, hp["steps"] // 10))
    lr_at = lambda s: args.lr * (s + 1) / warm if s < warm else \
        args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    gen = batches(train, args.batch, args.seq, np.random.default_rng(args.seed), device)
    l1_coef, log, evals, best = 0.0, [], [], None
    aux_coef = float(cfg_d.get("router_aux_loss_coef", 0.02))
    t0 = time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        x, y = next(gen)
        taps.clear()
        ce = forward_loss(model, x, y, ac)
        bal = taps.balance_loss(cfg.num_experts)
        l1 = taps.l1() if hp["target_sparsity"] > 0 else torch.zeros((), device=device)
        loss = ce + aux_coef * bal + l1_coef * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            sp = taps.sparsity()
            if hp["target_sparsity"] > 0 and step >= warm:   # a controller, not a planted mask
                l1_coef = max(l1_coef * 1.2, 1e-4) if sp < hp["target_sparsity"] else l1_coef * 0.9
            log.append({"step": step, "loss": float(ce.detach()), "balance": float(bal.detach()), "l1": float(l1.detach()),
                        "l1_coef": l1_coef, "sparsity": sp, "lr": lr_at(step), "s": round(time.time() - t0, 1)})
            if step % 100 == 0:
                print(name, json.dumps(log[-1]), flush=True)
        late = args.time_limit and time.time() - t0 > args.time_limit   # a guard, not the schedule
        if (step + 1) % args.eval_every == 0 or step == steps - 1 or late:
            ev = evaluate(model, taps, held, args.seq, args.batch, args.eval_windows, device, ac)
            ev["step"] = step + 1
            evals.append(ev)
            print(name, "eval", json.dumps(ev), flush=True)
            ok = ev["sparsity"] >= args.min_sparsity
            key = (ok, -ev["ppl"])
            if best is None or key > best[0]:
                best = (key, ev, {k: v.detach().to("cpu", torch.bfloat16).clone() for k, v in params.items()})
        if late:
            print(name, f"stopped by --time-limit after {step + 1} steps", flush=True)
            break
    _, best_ev, tensors = best
    from safetensors.torch import save_file
    save_file(tensors, str(out / f"{name}.safetensors"), metadata={"format": "pt"})
    res = {"variant": name, "steps_done": step + 1, "hparams": {**hp, "lr": args.lr, "wd": args.wd, "batch": args.batch, "seq": args.seq,
                                         "seed": args.seed, "aux_coef": aux_coef},
           "best": best_ev, "evals": evals, "log": log, "seconds": round(time.time() - t0, 1),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    (out / f"{name}.json").write_text(json.dumps(res))
    return res


def train(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    if len(names) > 1:        # one process per variant, side by side (the GPU is launch-bound here)
        procs = [subprocess.Popen([sys.executable, __file__, "train", *sys.argv[2:], "--variants", n])
                 for n in names]
        if any(p.wait() for p in procs):
            sys.exit("a variant failed")
    else:
        train_one(args, names[0], args.out)
    results = [json.loads((args.out / f"{n}.json").read_text()) for n in names]
    ok = [r for r in results if r["best"]["sparsity"] >= args.min_sparsity] or results
    pick = min(ok, key=lambda r: r["best"]["ppl"])
    summary = {"picked": pick["variant"], "variants": {r["variant"]: r["best"] for r in results}}
    print(json.dumps(summary))
    if len(names) > 1 or args.package:          # the parent: the picked weights as <16 MiB shards
        from hybridinfer.checkpoint import save_checkpoint
        from safetensors.torch import load_file
        tensors = load_file(str(args.out / f"{pick['variant']}.safetensors"))
        cfg = json.loads((args.data / "config.json").read_text())
        save_checkpoint(args.out / "model", cfg, tensors, shard_bytes=14 * 2**20)
        summary["runs"] = results
        (args.out / "summary.json").write_text(json.dumps(summary))


# ---- package: the folder shipped in hybridinfer/data/default_model ------------------------------

def package(weights: Path, data: Path, predictors: Path | None, profile: Path | None, out: Path) -> None:
    """config + weights (+ predictors under TurboSparse names, one safetensors) + tokenizer + profile."""
    import shutil

    from safetensors.torch import load_file

    from hybridinfer.checkpoint import save_checkpoint
    tensors = {}
    for f in sorted(weights.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if predictors is not None:
        pred = load_file(str(predictors))
        assert all(".predictor.fc" in k for k in pred), "not a predictors file"
        tensors.update({k: v.to(torch.bfloat16) for k, v in pred.items()})
    cfg = json.loads((weights / "config.json").read_text())
    extra = {n: (data / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json")}
    extra["README.md"] = (
        "# hybridinfer's bundled default model\n\n"
        "A 12.7M-parameter TurboSparse-Mixtral-layout MoE (6 layers, hidden 256, 8 dReLU experts of 256\n"
        "neurons, top-2, vocab 4096) trained from scratch by scripts/train_default_model.py on the Python 3.11\n"
        "documentation (Debian 12 python3.11-doc, PSF License Agreement: ../PSF-LICENSE.txt). Weights bf16,\n"
        "predictors (model.layers.N.block_sparse_moe.experts.E.predictor.fc{1,2}.weight) from\n"
        "`hybridinfer train-predictors`, profile.safetensors from `hybridinfer profile`.\n"
        "Figures and how to rebuild it: docs/DEFAULT_MODEL.md.\n")
    save_checkpoint(out, cfg, tensors, extra_files=extra)
    if profile is not None:
        shutil.copyfile(profile, out / "profile.safetensors")
    print(out, sum(f.stat().st_size for f in out.iterdir()), "bytes")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--corpus", type=Path, default=Path(".corpus"))
    p.add_argument("--out", type=Path, default=Path(".train_in"))
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--chat-repeats", type=int, default=4)
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, default=Path(".train_in"))
    t.add_argument("--out", type=Path, default=Path(".train_out"))
    t.add_argument("--variants", default="l1")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--wd", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--eval-windows", type=int, default=256)
    t.add_argument("--min-sparsity", type=float, default=0.82)
    t.add_argument("--time-limit", type=float, default=0, help="stop a variant after this many seconds")
    t.add_argument("--package", action="store_true", help="also write the picked model (model/) for one variant")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    k = sub.add_parser("package")
    k.add_argument("--weights", type=Path, default=Path(".train_out/model"), help="train's model/ folder")
    k.add_argument("--data", type=Path, default=Path(".train_in"), help="prepare's folder (tokenizer)")
    k.add_argument("--predictors", type=Path, default=None, help="train-predictors' predictors.safetensors")
    k.add_argument("--profile", type=Path, default=None, help="profile's .safetensors")
    k.add_argument("--out", type=Path, default=Path("hybridinfer/data/default_model"))
    args = ap.parse_args(argv)
    if args.cmd == "package":
        package(args.weights, args.data, args.predictors, args.profile, args.out)
    elif args.cmd == "prepare":
        prepare(args.corpus, args.out, args.vocab, args.chat_repeats)
    else:
        train(args)


if __name__ == "__main__":
    main()
