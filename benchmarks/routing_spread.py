"""How the synthetic M47 workload (bench decode) routes a prompt: tokens per expert in each layer.

    python benchmarks/routing_spread.py [--layers 4] [--tokens 256]

Real Mixtral spreads a prompt's tokens over all 8 experts; the synthetic model's random attention
makes the hidden states of a prompt's tokens nearly equal after a few layers, so from layer 2 on
every token picks the same two experts. Prefill then streams ~2-3 experts a layer, not 8: its
absolute figures are flattered for every policy that streams (hybrid and dense offload alike).
"""
import argparse

import torch

from hybridinfer import ffn as F
from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.workload import make_workload, synthetic_profile

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="M47 layers to build (CPU, q4_0)")
    ap.add_argument("--tokens", type=int, default=256, help="prompt length")
    a = ap.parse_args()
    torch.manual_seed(0)
    wl = make_workload("M47", a.layers, 0)
    b = build("cpu-sparse", wl, "cpu", torch.float32, torch.float32, None, synthetic_profile(wl),
              a.tokens + 8)
    counts = []
    route = F.route

    def spy(x, router, k):                        # the MoE layers call ffn.route in layer order
        w, ids = route(x, router, k)
        counts.append(torch.bincount(ids.flatten(), minlength=router.shape[0]).tolist())
        return w, ids
    F.route = spy
    try:
        ids = torch.randint(0, wl.cfg.vocab_size, (1, a.tokens), generator=torch.Generator().manual_seed(5))
        with torch.inference_mode():
            b.model(ids, b.model.new_cache(a.tokens + 1), last_only=True)
    finally:
        F.route = route
    print(f"M47 x {a.layers} layers, a {a.tokens}-token prompt, top-2: token-slots per expert")
    for layer, c in enumerate(counts):
        print(f"  layer {layer}: {sorted(c, reverse=True)}  experts used: {sum(1 for v in c if v)}")

if __name__ == "__main__":
    main()
