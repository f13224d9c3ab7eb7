"""The real peer: llama.cpp (through llama-cpp-python) on the same synthetic weights.

The workload is written as a GGUF file with llama.cpp's tensor names (the `gguf` package): the
FFN gate/up rows are the very q4_0 bytes our kernels read; down, attention, embeddings and the
output matrix are fresh q4_0 bytes of llama.cpp's layouts (down is [d, n_ff] there, neuron-major
here: same byte count, so the same bytes read per token). llama.cpp computes SwiGLU where we
compute dReLU; it reads the same bytes, so its dense decode time is the peer's. The tokenizer is
a placeholder SPM vocabulary of the model's size (byte tokens, <s>, </s>, fillers).
Neither package is a runtime dependency: `pip install gguf llama-cpp-python` (the harness says
so and skips the peer when they are missing).
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from .workload import BytePool, Workload


def _vocab(n: int):
    toks, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    toks += [f"<0x{i:02X}>" for i in range(256)]
    types += [6] * 256
    toks += [f"t{i}" for i in range(n - len(toks))]
    types += [1] * (n - len(types))
    return toks, [0.0] * n, types


def write_gguf(wl: Workload, path: str, context: int = 4096) -> str:
    import gguf

    c = wl.cfg
    d, ff, L, hd = c.hidden_size, c.intermediate_size, c.num_layers, c.head_dim
    arch = "llama"
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"hybridinfer-synthetic-{wl.shape}")
    w.add_block_count(L)
    w.add_context_length(context)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    if c.is_moe:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.experts_per_token)
    toks, scores, types = _vocab(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    Q4 = gguf.GGMLQuantizationType.Q4_0
    pool = BytePool(wl.seed + 17)

    def q4(name, t):
        w.add_tensor(name, np.ascontiguousarray(t.numpy()), raw_dtype=Q4)

    def f32(name, n):
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    q4("token_embd.weight", pool.packed(c.vocab_size, d))
    f32("output_norm.weight", d)
    q4("output.weight", pool.packed(c.vocab_size, d))
    for i in range(L):
        p = f"blk.{i}."
        f32(p + "attn_norm.weight", d)
        f32(p + "ffn_norm.weight", d)
        q4(p + "attn_q.weight", pool.packed(c.num_heads * hd, d))
        q4(p + "attn_k.weight", pool.packed(c.num_kv_heads * hd, d))
        q4(p + "attn_v.weight", pool.packed(c.num_kv_heads * hd, d))
        q4(p + "attn_output.weight", pool.packed(d, c.num_heads * hd))
        if c.is_moe:
            import torch
            ex = [wl.ffns[(i, e)] for e in range(c.num_experts)]
            w.add_tensor(p + "ffn_gate_inp.weight", np.zeros((c.num_experts, d), np.float32) + 0.01)
            q4(p + "ffn_gate_exps.weight", torch.stack([f.gate for f in ex]))
            q4(p + "ffn_up_exps.weight", torch.stack([f.up for f in ex]))
            q4(p + "ffn_down_exps.weight", torch.stack([pool.packed(d, ff) for _ in ex]))
        else:
            f = wl.ffns[(i, -1)]
            q4(p + "ffn_gate.weight", f.gate)
            q4(p + "ffn_up.weight", f.up)
            q4(p + "ffn_down.weight", pool.packed(d, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def time_llama(path: str, threads: int, n_gpu_layers: int, tokens: int, warmup: int,
               prefill: int) -> dict:
    from llama_cpp import Llama

    ctx = max(512, prefill + 1, warmup + tokens + 8)
    llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=n_gpu_layers, n_batch=min(512, ctx), verbose=False)
    rng = np.random.default_rng(3)
    ids = [int(t) for t in rng.integers(300, llm.n_vocab(), size=max(prefill, warmup + tokens))]
    llm.reset()
    llm.eval([1])
    secs = []
    for k in range(warmup + tokens):
        t = time.perf_counter()
        llm.eval([ids[k]])
        if k >= warmup:
            secs.append(time.perf_counter() - t)
    out = {"n_gpu_layers": n_gpu_layers, "threads": threads,
           "tok_s": 1.0 / float(np.median(secs)), "ms_token": float(np.median(secs)) * 1e3}
    if prefill:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:prefill])
        out["prefill_tok_s"] = prefill / (time.perf_counter() - t)
    del llm
    return out


def run_peer(wl: Workload, threads: int, args, rows) -> dict:
    """Write the GGUF, time llama.cpp at each --peer-gpu-layers; errors are reported, not raised."""
    try:
        import importlib
        importlib.import_module("gguf")     # write_gguf's dependency: checked here, reported below
        import llama_cpp
    except ImportError as e:
        msg = f"peer skipped: {e} (pip install gguf llama-cpp-python)"
        print(msg, flush=True)
        return {"error": msg}
    folder = args.gguf_dir or tempfile.mkdtemp(prefix="hybridinfer-gguf-")
    path = os.path.join(folder, f"synthetic-{wl.shape}-L{wl.cfg.num_layers}-q4_0.gguf")
    t = time.perf_counter()
    write_gguf(wl, path)
    out = {"gguf": path, "gguf_bytes": os.path.getsize(path), "write_s": time.perf_counter() - t,
           "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
           "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()), "rows": []}
    for ngl in args.peer_gpu_layers:
        try:
            r = time_llama(path, threads, ngl, args.tokens, args.warmup, args.prefill)
        except Exception as e:  # noqa: BLE001 - a peer failure is a reported result
            r = {"n_gpu_layers": ngl, "error": f"{type(e).__name__}: {e}"}
        out["rows"].append(r)
        print(f"llama.cpp -ngl {ngl}: {r.get('tok_s', float('nan')):.2f} tok/s {r.get('error', '')}",
              flush=True)
    if not args.gguf_dir:
        os.remove(path)
        os.rmdir(folder)
    return out
