"""An independent float64 reference of every supported family, written from the published
definitions (docs/MODELS.md) with numpy: full recompute, no KV cache, no torch modules."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file


def _load(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.double().numpy() for k, v in load_file(str(f)).items()})
    return out


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    """x [t, h, hd] rotate-half RoPE at positions pos [t]."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _act(g, u, arch, cfg):
    relu = lambda z: np.maximum(z, 0.0)  # noqa: E731
    if arch in ("BambooForCausalLM", "TurboSparseMixtralForCausalLM", "SuperSparseMixtralForCausalLM"):
        return relu(g) * relu(u)                          # dReLU
    act = cfg.get("hidden_act", "silu")
    if act == "relu":
        return relu(g) * u
    if act == "fatrelu":
        return np.where(g > cfg["hidden_act_param"], g, 0.0) * u
    return g / (1.0 + np.exp(-g)) * u                     # silu


def logits(folder: Path, ids: list[int]) -> np.ndarray:
    """[t, V] float64 logits of the model in `folder` for `ids` (positions 0..t-1)."""
    cfg = json.loads((folder / "config.json").read_text())
    arch = cfg["architectures"][0]
    W = _load(folder)
    d, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, t = d // H, cfg["rms_norm_eps"], len(ids)
    pos = np.arange(t, dtype=np.float64)
    win = cfg.get("sliding_window")
    allowed = np.tril(np.ones((t, t), bool))
    if win:
        allowed &= (pos[None, :] > pos[:, None] - win)
    x = W["model.embed_tokens.weight"][ids]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        h = _rms(x, W[p + "input_layernorm.weight"], eps)
        q = (h @ W[p + "self_attn.q_proj.weight"].T).reshape(t, H, hd)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).reshape(t, KV, hd)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(t, KV, hd)
        q, k = _rope(q, pos, cfg["rope_theta"]), _rope(k, pos, cfg["rope_theta"])
        out = np.zeros((t, H, hd))
        for head in range(H):
            kvh = head // (H // KV)
            s = q[:, head] @ k[:, kvh].T / np.sqrt(hd)
            s = np.where(allowed, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kvh]
        x = x + out.reshape(t, H * hd) @ W[p + "self_attn.o_proj.weight"].T
        h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
        if "num_local_experts" in cfg:
            m = p + "block_sparse_moe."
            r = h @ W[m + "gate.weight"].T
            pr = np.exp(r - r.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            y = np.zeros_like(h)
            for i in range(t):
                top = np.argsort(-pr[i])[: cfg["num_experts_per_tok"]]
                wts = pr[i, top] / pr[i, top].sum()
                for e, w in zip(top, wts):
                    ep = f"{m}experts.{e}."
                    a = _act(W[ep + "w1.weight"] @ h[i], W[ep + "w3.weight"] @ h[i], arch, cfg)
                    y[i] += w * (W[ep + "w2.weight"] @ a)
        else:
            a = _act(h @ W[p + "mlp.gate_proj.weight"].T, h @ W[p + "mlp.up_proj.weight"].T, arch, cfg)
            y = a @ W[p + "mlp.down_proj.weight"].T
        x = x + y
    x = _rms(x, W["model.norm.weight"], eps)
    return x @ W["lm_head.weight"].T
