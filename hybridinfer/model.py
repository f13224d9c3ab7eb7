"""The transformer: embeddings, RMSNorm, RoPE, grouped-query attention with a KV cache, and an FFN
per layer from ffn.py. Plain modules whose weights are tensors fetched by name from a Checkpoint.

Shapes: b = batch, t = new tokens, s = cached + new positions, d = hidden, h = heads,
kv = KV heads, hd = head dim, V = vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import quant
from .checkpoint import Checkpoint, ffn_names, layer_prefix, router_name, trim_heap
from .config import ModelConfig
from .errors import HybridInferError
from .ffn import DenseFFN, MoE
from .kernels import cpu as cpu_kernels
from .kernels import cpu_step
from .kernels import gpu as gpu_kernels
from .linear import linear  # noqa: F401 - the dispatch point (re-exported for graphs.py)
from .predictor import Predictor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., d] normalised in float32, scaled by weight [d], in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps   # [d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native_f32(x, self.weight) and x.is_contiguous():   # one native call (CPU decode)
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def _native_f32(*ts: torch.Tensor) -> bool:
    """Whether the decode step's small ops on these tensors go to the native CPU helpers
    (kernels.cpu.rms_norm / attend_one): float32 on the CPU. In torch each of them is ~5-20
    small ops of ~5-10 us dispatch apiece on a small CPU (~15 ms a token for M7's 32 layers)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)


def rope_tables(cfg: ModelConfig, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, hd] in float32, HF's rotate-half layout (frequencies repeated twice)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd))
    pos = torch.arange(length, dtype=torch.float64, device=device) / cfg.rope_scaling_factor
    ang = torch.outer(pos, inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, t, hd]; cos/sin [t, hd]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


class KVCache:
    """Per-layer K and V [b, kv, capacity, hd], filled up to `length` positions."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device, dtype):
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.capacity = capacity
        self.length = 0


def qkv_projections(x, q, k, v, qb, kb, vb, qkv=None):
    """x [..., d] -> (q, k, v) projections (+ biases); qkv: the three weights fused (one linear,
    then split), else three linears. A plain function: torch.compile traces it in attn_step."""
    if qkv is None:
        return linear(x, q, qb), linear(x, k, kb), linear(x, v, vb)
    y = linear(x, qkv)
    q_, k_, v_ = y.split([q.out_features, k.out_features, v.out_features], dim=-1)
    return (q_ if qb is None else q_ + qb, k_ if kb is None else k_ + kb,
            v_ if vb is None else v_ + vb)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        # [h*hd, d] ... [d, h*hd]: torch tensors, PackedLinear or DeviceLinear (see `linear`)
        self.q, self.k, self.v, self.o = w["q"], w["k"], w["v"], w["o"]
        self.qb, self.kb, self.vb, self.ob = w.get("qb"), w.get("kb"), w.get("vb"), w.get("ob")
        # q, k, v as views of one packed matrix (kernels.gpu.stacked_linears): one GEMV for all
        self.qkv = w.get("qkv")

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., d] -> q [..., H*hd], k, v [..., KV*hd] (one launch when fused)."""
        return qkv_projections(x, self.q, self.k, self.v, self.qb, self.kb, self.vb, self.qkv)

    def forward(self, x, layer, cache: KVCache, cos, sin, mask) -> torch.Tensor:
        """x [b, t, d] -> [b, t, d]; writes K/V at positions cache.length .. +t."""
        c, (b, t, _) = self.cfg, x.shape
        if t == 1 and b == 1 and _native_f32(x, cache.k[layer]) and x.is_contiguous():   # CPU decode
            pos = cache.length
            lo = max(0, pos + 1 - c.sliding_window) if c.sliding_window else 0
            if isinstance(self.qkv, cpu_kernels.PackedLinear) and self.qb is None:
                qkv = (cpu_kernels.linear(x.view(-1), self.qkv), None, None)   # [q | k | v]
            else:
                qkv = (t_.reshape(-1).contiguous() for t_ in self.project_qkv(x))
            y = cpu_kernels.attend_one(*qkv, cache.k[layer], cache.v[layer], pos, cos[0], sin[0], lo)
            if isinstance(self.o, cpu_kernels.PackedLinear) and self.ob is None:
                return cpu_kernels.linear(y, self.o).view(1, 1, -1)
            return linear(y.view(1, 1, -1), self.o, self.ob)
        q, k, v = self.project_qkv(x)
        q = q.reshape(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = cache.length
        cache.k[layer][:, :, start:start + t] = k
        cache.v[layer][:, :, start:start + t] = v
        ks = cache.k[layer][:, :, :start + t]           # [b, kv, s, hd]
        vs = cache.v[layer][:, :, :start + t]
        # GQA without copying K/V per head: the rep query heads of each KV head as one group of
        # rep*t rows (head j*rep + r, token i -> row r*t + i of group j), the mask repeated to match
        rep = c.num_heads // c.num_kv_heads
        qg = q.reshape(b, c.num_kv_heads, rep * t, c.head_dim)
        if t == 1:   # decode: three small ops (SDPA's CPU kernel costs ~85 us a call at this size)
            sc = torch.matmul(qg, ks.transpose(-1, -2)).float() * c.head_dim ** -0.5   # [b, kv, rep, s]
            if c.sliding_window:
                sc = sc.masked_fill(~mask, float("-inf"))                           # mask [1, s]
            y = torch.matmul(torch.softmax(sc, dim=-1).to(vs.dtype), vs)
        else:
            mask = mask.repeat(rep, 1) if rep > 1 else mask                           # [rep*t, s]
            y = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=mask)
        y = y.reshape(b, c.num_heads, t, c.head_dim)      # SDPA on CUDA may return a strided view
        return linear(y.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim), self.o, self.ob)


class Block(nn.Module):
    def __init__(self, cfg, attn_norm, attn, ffn_norm, ffn):
        super().__init__()
        self.cfg = cfg
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn
        self._step = (None, None)    # (the cache's buffers it is bound to, its AttnStep | None)

    def cpu_step(self, x, layer, cache):
        """The bound kernels.cpu_step.AttnStep for a one-token float32 step on the CPU with q, k, v
        stacked in a PackedLinear and no biases (the attention half in one native call), else
        None. Bound per cache (by its buffers' addresses and shape: no reference kept)."""
        if x.dtype != torch.float32 or x.numel() != x.shape[-1] or x.device.type != "cpu" \
                or not x.is_contiguous():
            return None
        return self.bind_step(layer, cache)

    def bind_step(self, layer, cache):
        """cpu_step's AttnStep for this cache (no check of the input)."""
        kc, vc = cache.k[layer], cache.v[layer]
        key = (kc.data_ptr(), vc.data_ptr(), kc.shape, kc.dtype)
        if self._step[0] == key:
            return self._step[1]
        a, n1, n2 = self.attn, self.attn_norm, self.ffn_norm
        ok = (isinstance(a.qkv, cpu_kernels.PackedLinear) and isinstance(a.o, cpu_kernels.PackedLinear)
              and a.qb is None and a.ob is None and n1.eps == n2.eps and kc.shape[0] == 1
              and _native_f32(kc, vc, n1.weight, n2.weight))
        step = cpu_step.AttnStep(n1.weight, a.qkv, a.o, n2.weight, n1.eps, kc, vc,
                                 self.cfg.num_heads) if ok else None
        self._step = (key, step)
        return step

    def forward(self, x, layer, cache, cos, sin, mask):
        step = self.cpu_step(x, layer, cache)
        if step is not None:            # CPU decode: the attention half is one native call
            pos, w = cache.length, self.cfg.sliding_window
            x, h = step.run_trusted(x, pos, max(0, pos + 1 - w) if w else 0, cos[0], sin[0])
            x = x.view(1, 1, -1)
            return x + self.ffn(h.view(1, -1)).view_as(x)
        a = self.attn(self.attn_norm(x), layer, cache, cos, sin, mask)
        n = self.ffn_norm
        if _native_f32(x, a, n.weight) and x.is_contiguous() and a.is_contiguous():
            x, h = cpu_kernels.rms_norm(a, n.weight, n.eps, residual=x)   # x + a and its norm
        else:
            x = x + a
            h = n(x)
        return x + self.ffn(h.reshape(-1, h.shape[-1])).view_as(h)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, embed, blocks, norm, lm_head, device):
        super().__init__()
        self.cfg, self.device = cfg, device
        self.embed = embed           # [V, d]
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.lm_head = lm_head       # [V, d] (the embedding when tied), or a PackedLinear / DeviceLinear
        self._rope_len = 0

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        if capacity > self.cfg.max_position_embeddings:
            raise HybridInferError(
                f"{capacity} positions exceed the model's max_position_embeddings "
                f"({self.cfg.max_position_embeddings})")
        if capacity > self._rope_len:
            self.cos, self.sin = rope_tables(self.cfg, capacity, self.device)
            self._rope_len = capacity
        return KVCache(self.cfg, batch, capacity, self.device, self.embed.dtype)

    def _mask(self, start: int, t: int) -> torch.Tensor:
        """[t, s] boolean: query i (position start+i) sees key j if j <= start+i, within the window."""
        qpos = torch.arange(start, start + t, device=self.device)[:, None]
        kpos = torch.arange(start + t, device=self.device)[None, :]
        ok = kpos <= qpos
        if self.cfg.sliding_window:
            ok &= kpos > qpos - self.cfg.sliding_window
        return ok

    def _cpu_plan(self, cache: KVCache):
        """A float32 CPU model whose every layer has a bound AttnStep and a CPU-only HybridFFN:
        per layer (the AttnStep's native run, the FFN, x_out [d], the pointers it reads and
        writes), bound once per cache (keyed by its buffers' addresses); else None."""
        from .ffn import HybridFFN
        key = (cache.capacity, tuple(k.data_ptr() for k in cache.k), tuple(v.data_ptr() for v in cache.v))
        if getattr(self, "_plan", (None, None))[0] == key:
            return self._plan[1]
        plan = None
        if self.embed.dtype == torch.float32 and self.device.type == "cpu" and self.embed.is_contiguous() \
                and all(isinstance(b.ffn, HybridFFN) and b.ffn._cpu_only for b in self.blocks):
            steps = [b.bind_step(i, cache) for i, b in enumerate(self.blocks)]
            if all(s is not None for s in steps):
                plan = []
                for s, b in zip(steps, self.blocks):
                    bx, _, by = b.ffn.cpu_bound()
                    xo = torch.empty(self.cfg.hidden_size)
                    plan.append((s._a.run, b.ffn, xo, xo.data_ptr(), bx.data_ptr(), by))
        self._plan = (key, plan)
        return plan

    def _decode_cpu(self, plan, token: int, start: int) -> torch.Tensor:
        """One token through the bound plan -> the last hidden state [1, 1, d] (before the norm).
        Per layer two native calls (the attention half into x_out and the FFN's x, then the
        FFN) and the predictor: the previous FFN's output is the next attention half's `add`."""
        d, hd, w = self.cfg.hidden_size, self.cfg.head_dim, self.cfg.sliding_window
        lo = max(0, start + 1 - w) if w else 0
        cp = self.cos.data_ptr() + 4 * start * hd
        sp = self.sin.data_ptr() + 4 * start * hd
        xp, yp, y = self.embed.data_ptr() + 4 * token * d, 0, None
        for run, ffn, xo, xop, hp, y in plan:
            run(xp, yp, start, lo, cp, sp, xop, hp)
            ffn.run_bound()
            xp, yp = xop, y.data_ptr()
        return (xo + y).view(1, 1, -1)

    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """tokens [b, t] at positions cache.length.. -> logits [b, t or 1, V] float32."""
        b, t = tokens.shape
        start = cache.length
        if start + t > cache.capacity:
            raise HybridInferError(f"context full: {start + t} positions, cache holds {cache.capacity}")
        if b * t == 1 and tokens.device.type == "cpu":
            plan = self._cpu_plan(cache)
            if plan is not None:            # CPU decode: two native calls a layer, no torch ops
                tok = int(tokens[0, 0])
                if not 0 <= tok < self.cfg.vocab_size:
                    raise HybridInferError(f"token id {tok} outside the vocabulary ({self.cfg.vocab_size})")
                x = self._decode_cpu(plan, tok, start)
                cache.length = start + 1
                return linear(self.norm(x), self.lm_head).float()
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        mask = self._mask(start, t)
        x = F.embedding(tokens.to(self.embed.device), self.embed).to(self.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, i, cache, cos, sin, mask)
        cache.length = start + t
        if last_only:
            x = x[:, -1:]
        h = self.norm(x)
        return linear(h.to(self.lm_head.device), self.lm_head).float()


def build_model(cfg: ModelConfig, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                with_predictors: bool = True, ffn_factory=None, moe_class=MoE,
                places: dict[str, bool] | None = None, cpu_linear_fmt: str | None = None,
                gpu_linear_fmt: str | None = None) -> Transformer:
    """Fetch every tensor by its architecture's name, check its shape, and place it.

    ffn_factory(layer, expert, fetch, predictor) -> module builds each FFN instead of a DenseFFN
    on `device`; fetch("gate" | "up" | "down") gives its CPU (memory-mapped) weights, read only
    when asked (the hybrid build uses it; synthetic benchmarks need not).
    places: component ("embeddings", "lm_head", "predictors") -> False where a placement keeps
    it off the GPU side (then it lives on the CPU); default True. The model's `device_bytes`
    counts, per component, the bytes this build put on the GPU side (what the planner budgeted:
    tests hold the two together).
    cpu_linear_fmt (e.g. "q4_0"): the attention projections and lm_head that end up on the CPU
    are packed in this format (kernels.cpu.PackedLinear) and read by the C++ kernels, as
    llama.cpp reads them, instead of torch's float matmul; predictors on the CPU in q8_0.
    gpu_linear_fmt (footprint.linear_fmt of the hot rows' format, e.g. "q4_0"): the attention
    projections and lm_head on the GPU side are packed in it (kernels.gpu.DeviceLinear, a Triton
    GEMV at decode), where cpu_linear_fmt does not already pack them for the CPU kernels."""
    d, ff, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    places = places or {}
    placed: dict[str, int] = {}

    def get(name, shape, component="attention"):
        on_gpu_side = places.get(component, True)
        t = ckpt.get(name, shape)
        out = t.to(device=device if on_gpu_side else "cpu", dtype=dtype)
        if out.data_ptr() != t.data_ptr():   # a converted copy is kept: unmap the source pages
            ckpt.release(name)
        if on_gpu_side:
            placed[component] = placed.get(component, 0) + out.numel() * out.element_size()
        return out

    def lin(name, shape, component="attention", fmt=cpu_linear_fmt, gpu_fmt=gpu_linear_fmt,
            transposed=False):
        """A linear layer's weight: packed for the CPU kernels (in fmt) when it lives on the CPU
        and cpu_linear_fmt is set; else packed for the GPU side's GEMV (gpu_fmt) when it lives
        there and its rows hold whole blocks; else the tensor of get().
        transposed: on the CPU, the rows of W^T instead (plain rows, read by relu_mlp_t /
        rows_axpy: a predictor's fc2); only where the layer is packed for the CPU."""
        on_gpu_side = places.get(component, True)
        on_cpu = torch.device(device if on_gpu_side else "cpu").type == "cpu"
        if cpu_linear_fmt is not None and on_cpu:
            w = ckpt.get(name, shape)
            if transposed:
                w = w.t().contiguous()
            if fmt in quant.BLOCK_FORMATS and w.shape[1] % quant.QK:   # blocks do not fit: f32 rows
                fmt = "f32"
            w = cpu_kernels.PackedLinear.from_weight(w, fmt, grouped=False if transposed else None)
        elif transposed:
            raise AssertionError("lin: transposed rows are made for the CPU kernels only")
        elif gpu_fmt is not None and on_gpu_side and shape[1] % quant.QK == 0:
            w = gpu_kernels.DeviceLinear.from_weight(ckpt.get(name, shape), gpu_fmt, device)
        else:
            return get(name, shape, component)
        ckpt.release(name)
        if on_gpu_side:
            placed[component] = placed.get(component, 0) + w.nbytes
        return w

    def ffn(layer, expert=None):
        n = ffn_names(cfg.family, layer, expert)
        pred = None
        if with_predictors and n["fc1"] in ckpt and n["fc2"] in ckpt:
            rank = ckpt.shape(n["fc1"])[0]
            # on the CPU with a quantised format: q8_0 rows (the scores' sign decides the mask,
            # so the predictor keeps more precision than the FFN rows)
            # packed for the CPU: fc2 as the rows of fc2^T (Predictor.fc2t: relu's zeros unread)
            fc1 = lin(n["fc1"], (rank, d), "predictors", "q8_0", None)
            cpu_rows = isinstance(fc1, cpu_kernels.PackedLinear)
            fc2 = lin(n["fc2"], (ff, rank), "predictors", "q8_0", None, transposed=cpu_rows)
            pred = Predictor(fc1, None, fc2t=fc2) if cpu_rows else Predictor(fc1, fc2)
        if ffn_factory is not None:
            shapes = {"gate": (ff, d), "up": (ff, d), "down": (d, ff)}
            module = ffn_factory(layer, expert, lambda key: ckpt.get(n[key], shapes[key]), pred)
            for key in shapes:          # the factory kept its own copies: unmap the source pages
                ckpt.release(n[key])
            trim_heap()                 # and return its temporaries to the OS
            placed["ffn_hot"] = placed.get("ffn_hot", 0) + getattr(module, "device_bytes", 0)
            return module
        return DenseFFN(get(n["gate"], (ff, d)), get(n["up"], (ff, d)), get(n["down"], (d, ff)),
                        cfg.activation, cfg.act_threshold, pred)

    blocks = []
    for i in range(cfg.num_layers):
        p = layer_prefix(i)
        a = p + "self_attn."
        qkv = [(a + "q_proj.weight", (cfg.num_heads * hd, d)),
               (a + "k_proj.weight", (cfg.num_kv_heads * hd, d)),
               (a + "v_proj.weight", (cfg.num_kv_heads * hd, d))]
        w = {"o": lin(a + "o_proj.weight", (d, cfg.num_heads * hd))}
        # q, k, v stacked in one packed matrix, each a view of its rows: one GEMV on the GPU side,
        # one native call on the CPU (M7 on 2 cores: k and v alone ran at ~17 GB/s, q at ~19,
        # each call paying its own start)
        getters = [(lambda n=n, s=s: ckpt.get(n, s), s[0]) for n, s in qkv]
        views = None
        if isinstance(w["o"], gpu_kernels.DeviceLinear) and d % quant.QK == 0:
            w["qkv"], views = gpu_kernels.stacked_linears(getters, d, gpu_linear_fmt, device)
            placed["attention"] = placed.get("attention", 0) + w["qkv"].nbytes
        elif isinstance(w["o"], cpu_kernels.PackedLinear):
            fmt = "f32" if cpu_linear_fmt in quant.BLOCK_FORMATS and d % quant.QK else cpu_linear_fmt
            w["qkv"], views = cpu_kernels.stacked_linears(getters, d, fmt)
        if views is None:
            w.update((key, lin(n, s)) for key, (n, s) in zip("qkv", qkv))
        else:
            for n, _ in qkv:
                ckpt.release(n)
            w.update(zip("qkv", views))
        if cfg.attention_bias:
            w.update(qb=get(a + "q_proj.bias", (cfg.num_heads * hd,)),
                     kb=get(a + "k_proj.bias", (cfg.num_kv_heads * hd,)),
                     vb=get(a + "v_proj.bias", (cfg.num_kv_heads * hd,)),
                     ob=get(a + "o_proj.bias", (d,)))
        if cfg.is_moe:
            f = moe_class(get(router_name(i), (cfg.num_experts, d), "router"),
                    [ffn(i, e) for e in range(cfg.num_experts)], cfg.experts_per_token)
        else:
            f = ffn(i)
        blocks.append(Block(cfg, RMSNorm(get(p + "input_layernorm.weight", (d,), "norms"), cfg.rms_norm_eps),
                            Attention(cfg, w),
                            RMSNorm(get(p + "post_attention_layernorm.weight", (d,), "norms"),
                                    cfg.rms_norm_eps),
                            f))
    embed = get("model.embed_tokens.weight", (cfg.vocab_size, d), "embeddings")
    if "lm_head.weight" in ckpt:
        lm_head = lin("lm_head.weight", (cfg.vocab_size, d), "lm_head")
    elif cfg.tie_word_embeddings:
        lm_head = embed
        if cpu_linear_fmt is not None and embed.device.type == "cpu":   # a packed copy to read
            lm_head = cpu_kernels.PackedLinear.from_weight(embed, cpu_linear_fmt)
    else:
        raise HybridInferError(f"{ckpt.folder}: missing tensor 'lm_head.weight'")
    norm = RMSNorm(get("model.norm.weight", (d,), "norms"), cfg.rms_norm_eps)
    model = Transformer(cfg, embed, blocks, norm, lm_head, device)
    model.device_bytes = placed
    return model
