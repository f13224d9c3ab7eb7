"""Generation as small functions: prefill, decode_one_token, sample, generate_tokens, and the
text layer (incremental detokenisation, stop strings) used by LLM.stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from .errors import HybridInferError
from .model import KVCache, Transformer


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.7     # 0 = greedy
    top_k: int = 0               # 0 = off
    top_p: float = 1.0           # 1 = off
    seed: int | None = 0         # None = nondeterministic
    stop: tuple[str, ...] = ()   # stop strings (not included in the output)
    stop_on_eos: bool = True

    def validate(self) -> "GenerationConfig":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise HybridInferError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise HybridInferError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise HybridInferError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise HybridInferError(f"top_p must be in (0, 1], got {self.top_p}")
        return self

    def with_options(self, **options) -> "GenerationConfig":
        unknown = set(options) - set(self.__dataclass_fields__)
        if unknown:
            raise HybridInferError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        if isinstance(options.get("stop"), str):
            options["stop"] = (options["stop"],)
        elif options.get("stop") is not None:
            options["stop"] = tuple(options["stop"])
        return replace(self, **{k: v for k, v in options.items() if v is not None}).validate()


def sample(logits: torch.Tensor, g: GenerationConfig, gen: torch.Generator | None) -> int:
    """logits [V] float32 -> one token id."""
    if g.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / g.temperature
    if g.top_k:
        kth = torch.topk(logits, min(g.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if g.top_p < 1.0:
        sp, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < g.top_p        # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, idx, sp * keep)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def prefill(model: Transformer, ids: list[int], cache: KVCache, chunk: int = 512) -> torch.Tensor:
    """Run the prompt through the model in chunks of `chunk` tokens (bounded activation and
    attention memory; each chunk dequantises the block-format weights it multiplies, so chunks
    are large); logits of its last position [V]."""
    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    for s in range(0, len(ids), chunk):
        logits = model(tokens[:, s:s + chunk], cache, last_only=True)
    return logits[0, -1]


def decode_one_token(model: Transformer, token: int, cache: KVCache) -> torch.Tensor:
    tokens = torch.tensor([[token]], dtype=torch.long, device=model.device)
    return model(tokens, cache)[0, -1]


@torch.inference_mode()
def generate_tokens(model: Transformer, prompt: list[int], g: GenerationConfig,
                    eos_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield up to max_new_tokens ids; stops after an EOS id (not yielded) when stop_on_eos."""
    if not prompt:
        raise HybridInferError("the prompt is empty: give at least one token")
    if g.max_new_tokens == 0:
        return
    capacity = min(len(prompt) + g.max_new_tokens, model.cfg.max_position_embeddings)
    if len(prompt) >= capacity:
        raise HybridInferError(
            f"the prompt has {len(prompt)} tokens; the model holds {model.cfg.max_position_embeddings}")
    gen = None
    if g.temperature > 0:
        gen = torch.Generator()
        if g.seed is None:
            gen.seed()
        else:
            gen.manual_seed(g.seed)
    graphs = getattr(model, "graph_decoder", None)       # CUDA graphs for batch-1 decode
    if graphs is not None and capacity <= graphs.C:
        cache = graphs.cache
        cache.length = 0
        step = graphs.step
    else:
        cache = model.new_cache(capacity)
        step = lambda tok: decode_one_token(model, tok, cache)  # noqa: E731
    logits = prefill(model, prompt, cache)
    n_new = capacity - len(prompt)
    for i in range(n_new):
        tok = sample(logits, g, gen)
        if g.stop_on_eos and tok in eos_ids:
            return
        yield tok
        if i + 1 < n_new:               # the last token needs no forward pass of its own
            logits = step(tok)


@dataclass
class TextStream:
    """Turns token ids into text deltas: waits out incomplete UTF-8 and possible stop prefixes."""
    decode: Callable[[list[int]], str]
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    emitted: int = 0
    stopped: bool = False

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                return self._emit(text[:at], final=True)
        if text.endswith("\ufffd"):        # a multi-byte character not yet complete
            return ""
        return self._emit(text, final=False)

    def _emit(self, text: str, final: bool) -> str:
        end = len(text)
        if not final:   # hold back a tail that could still become a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        end = min(end, len(text) - k)
                        break
        out = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self.decode(self.ids), final=True)
