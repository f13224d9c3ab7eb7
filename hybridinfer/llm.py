"""LLM: a loaded model + tokenizer with generate / stream / chat / logits. load() builds one."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import torch

from . import default_model, quant, registry
from .config import ModelConfig
from .errors import HybridInferError
from .generate import GenerationConfig, TextStream, generate_tokens
from .model import Transformer
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "f32": torch.float32, "float16": torch.float16,
          "f16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HybridInferError(f"bad device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HybridInferError("device 'cuda' asked for, but torch sees no CUDA GPU (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise HybridInferError(f"device {device} does not exist ({torch.cuda.device_count()} GPUs)")
    elif dev.type != "cpu":
        raise HybridInferError(f"bad device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto': float32 on the CPU (exact reference arithmetic), the checkpoint's dtype on a GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else DTYPES.get(cfg.torch_dtype, torch.float16)
    if dtype not in DTYPES:
        raise HybridInferError(f"bad dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, folder: Path,
                 defaults: GenerationConfig = GenerationConfig()):
        self.model, self.tokenizer, self.folder = model, tokenizer, folder
        self.config = model.cfg
        self.defaults = defaults
        eos = set(self.config.eos_token_ids)
        for tok in (tokenizer.eos_id, tokenizer.token_id("<|im_end|>")):
            if tok is not None:
                eos.add(tok)
        self.eos_ids = tuple(sorted(eos))

    # -- text in, text out --
    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Yield text pieces as they are generated."""
        if not isinstance(prompt, str) or not prompt:
            raise HybridInferError("the prompt is empty")
        yield from self._stream_ids(self.tokenizer.encode(prompt), **sampling)

    def generate(self, prompt: str, **sampling) -> str:
        return "".join(self.stream(prompt, **sampling))

    def chat(self, messages: list[dict], **sampling) -> str:
        return "".join(self.stream_chat(messages, **sampling))

    def stream_chat(self, messages: list[dict], **sampling) -> Iterator[str]:
        text = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        yield from self._stream_ids(ids, **sampling)

    def _stream_ids(self, ids: list[int], **sampling) -> Iterator[str]:
        g = self.defaults.with_options(**sampling)
        ts = TextStream(self.tokenizer.decode, g.stop)
        for tok in generate_tokens(self.model, ids, g, self.eos_ids):
            piece = ts.push(tok)
            if piece:
                yield piece
            if ts.stopped:
                return
        tail = ts.finish()
        if tail:
            yield tail

    # -- scoring --
    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len, vocab] (float32, on the CPU) for every position of token_ids."""
        if len(token_ids) == 0:
            raise HybridInferError("logits() needs at least one token")
        if min(token_ids) < 0 or max(token_ids) >= self.config.vocab_size:
            raise HybridInferError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        cache = self.model.new_cache(len(token_ids))
        tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=self.model.device)
        return self.model(tokens, cache)[0].cpu()

    def perplexity(self, text: str, window: int | None = None) -> float:
        """exp(mean NLL) of the text's tokens after the first, in windows of the context length."""
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise HybridInferError("the text is too short to score (needs at least two tokens)")
        window = min(window or self.config.max_position_embeddings, self.config.max_position_embeddings)
        nll, n = 0.0, 0
        for s in range(0, len(ids) - 1, window - 1):
            chunk = ids[s:s + window]
            if len(chunk) < 2:
                break
            lp = torch.log_softmax(self.logits(chunk).double(), dim=-1)
            tgt = torch.tensor(chunk[1:])
            nll -= lp[:-1].gather(1, tgt[:, None]).sum().item()
            n += len(chunk) - 1
        return math.exp(nll / n)


def load(model: str | os.PathLike | None = None, *, device: str | None = None,
         dtype: str | torch.dtype | None = "auto", threads: int | None = None,
         sparsity: str | None = None, vram_budget: str | int | None = None,
         context: int | None = None, profile: str | None = None, weights: str = "auto",
         gpu_weights: str = "auto", predictors: str | None = None,
         predictor_threshold: float | None = None, cuda_graphs: bool = True,
         pcie_share: float | str | None = None, **defaults) -> LLM:
    """Load a model folder or known name (None: the bundled default) -> LLM.

    device: where the GPU part lives ("cuda", "cuda:1", or "cpu"; None: cuda when present).
    sparsity: "dense" | "exact" | "predictor" (None: predictor when the model has predictors,
      else exact). "dense" with no vram_budget is the plain dense reference on `device`.
    vram_budget: "16GiB", "0.8" (share of free VRAM), "auto", 0, or bytes (None: auto on a GPU,
      0 on the CPU); the plan is cached on disk. context: KV positions to budget.
    profile: a neuron profile file (default: found next to the model, or uniform).
    predictors: trained predictors (file or folder; default: what train-predictors wrote, if any).
    predictor_threshold: score above which a neuron is predicted active (None: the
      predictor_config.json beside the predictors in use, written by `calibrate-predictors`, else 0.0).
    cuda_graphs: one-token decode replays CUDA graphs of each layer's GPU work (on a GPU).
    pcie_share: share of each FFN's expected cold activity the GPU reads over PCIe from page-locked
      host rows in decode (the plan's warm tier): 0..1, or "auto" (per FFN, balancing the CPU's
      time against the PCIe reads'; None: auto on a CUDA device, else 0).
    weights / gpu_weights: format of the cold (CPU) / hot (GPU) FFN rows: auto, f32, f16, bf16,
      q8_0, q4_0 (a quantised `weights` also packs the CPU's attention, lm_head and predictors
      for the C++ kernels, and leaves torch one thread). threads: CPU threads (torch and the
      sparse kernels).
    Further keywords set default sampling options (temperature, top_p, ...).
    """
    from .loader import LoadOptions, build

    if threads is not None:
        if int(threads) < 1:
            raise HybridInferError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
        try:
            from .kernels import cpu
            cpu.set_num_threads(int(threads))
        except ImportError:
            pass
    folder = default_model.ensure() if model is None else registry.resolve(model)
    cfg = ModelConfig.from_dir(folder)
    dev = resolve_device(device)
    tok = Tokenizer(folder)
    opts = LoadOptions(dev, resolve_dtype(dtype, cfg, dev), sparsity=sparsity, vram_budget=vram_budget,
                       context=context, profile=profile, cpu_fmt=weights, gpu_fmt=gpu_weights,
                       predictors=predictors, predictor_threshold=predictor_threshold,
                       cuda_graphs=cuda_graphs, pcie_share=pcie_share)
    _, net = build(folder, opts)
    if weights in quant.BLOCK_FORMATS:
        # every large CPU matrix is read by the kernel pool; torch is left with small ops, and its
        # OpenMP workers spinning after each would steal the pool's cores (bench decode M7 x 8
        # layers on 2 cores: 84-95 ms/token with one torch thread, 126-266 with two)
        torch.set_num_threads(1)
    return LLM(net, tok, folder, GenerationConfig().with_options(**defaults))
