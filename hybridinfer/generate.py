"""Generation as small functions: prefill, decode_one_token, sample, generate_tokens, and the
text layer (incremental detokenisation, stop strings) used by LLM.stream.
"""
from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field, replace
from itertools import chain
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


def choose(logits: torch.Tensor, g: GenerationConfig, u: torch.Tensor | None) -> torch.Tensor:
    """logits [V] float32 -> the next token id, a one-element long tensor on the logits' device,
    made without reading anything back to the host (a run-ahead decode chooses on the device).
    Greedy at temperature 0; else temperature, top-k and top-p shape the distribution and the
    token is where the uniform u in [0, 1) (a 0-d tensor on the same device, from uniforms())
    falls in its cumulative sum: inverse-CDF sampling, the same draw wherever it runs."""
    if g.temperature == 0:
        return torch.argmax(logits).reshape(1)
    logits = logits / g.temperature
    if g.top_k:
        kth = torch.topk(logits, min(g.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if g.top_p < 1.0:
        sp, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < g.top_p        # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, idx, sp * keep)
    cdf = torch.cumsum(probs, 0)
    # the first token whose cumulative sum passes u (scaled by the total: top-p leaves < 1);
    # tokens of probability 0 are never that first one
    at = torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True)
    return at.clamp_(max=logits.numel() - 1)


def uniforms(g: GenerationConfig, n: int, gen: torch.Generator | None = None) -> torch.Tensor | None:
    """n draws in [0, 1) for choose(), float32 on the CPU, from `gen` or else the config's seed
    (seed None: nondeterministic); None when greedy (no draws)."""
    if g.temperature == 0:
        return None
    if gen is None:
        gen = torch.Generator()
        if g.seed is None:
            gen.seed()
        else:
            gen.manual_seed(g.seed)
    return torch.rand(n, generator=gen)


def sample(logits: torch.Tensor, g: GenerationConfig, gen: torch.Generator | None) -> int:
    """logits [V] float32 -> one token id (one draw from `gen` unless greedy)."""
    u = uniforms(g, 1, gen)
    return int(choose(logits, g, None if u is None else u[0].to(logits.device)))


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
    """Yield up to max_new_tokens ids; stops after an EOS id (not yielded) when stop_on_eos.
    Token i is choose(logits, g, u[i]) with u = uniforms(g, n): the CUDA-graph decoder (where the
    model has one) chooses on the device and runs one token ahead (GraphDecoder.stream); the
    plain path chooses the same way on the host."""
    if not prompt:
        raise HybridInferError("the prompt is empty: give at least one token")
    if g.max_new_tokens == 0:
        return
    capacity = min(len(prompt) + g.max_new_tokens, model.cfg.max_position_embeddings)
    if len(prompt) >= capacity:
        raise HybridInferError(
            f"the prompt has {len(prompt)} tokens; the model holds {model.cfg.max_position_embeddings}")
    n_new = capacity - len(prompt)
    u = uniforms(g, n_new)
    graphs = getattr(model, "graph_decoder", None)       # CUDA graphs for batch-1 decode
    if graphs is not None and capacity <= graphs.C:
        cache = graphs.cache
        cache.length = 0
    else:
        graphs, cache = None, model.new_cache(capacity)
    logits = prefill(model, prompt, cache)
    u = None if u is None else u.to(logits.device)

    def select(lg: torch.Tensor, i: int) -> torch.Tensor:         # token i's choice
        return choose(lg, g, None if u is None else u[i])
    tok = int(select(logits, 0))
    after = lambda lg, i: select(lg, i + 1)                         # noqa: E731
    if graphs is not None:                # the last token needs no forward pass of its own
        rest = graphs.stream(tok, n_new - 1, after)
    else:
        rest = step_stream(lambda t: decode_one_token(model, t, cache), tok, n_new - 1, after)
    with closing(rest):
        for tok in chain([tok], rest):
            if g.stop_on_eos and tok in eos_ids:
                return
            yield tok


def step_stream(step: Callable[[int], torch.Tensor], token: int, n: int,
                select: Callable[[torch.Tensor, int], torch.Tensor]) -> Iterator[int]:
    """The n tokens after `token`, one step(token) -> logits a token, token i chosen by
    select(logits, i) (GraphDecoder.stream's contract, without running ahead)."""
    for i in range(n):
        token = int(select(step(token), i))
        yield token


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
