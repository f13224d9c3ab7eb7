"""How the synthetic M47 workload (bench decode) routes tokens: per layer, token-slots per expert
of a prompt, and of a greedy decode as bench decode runs it.

    python benchmarks/routing_spread.py [--layers 4] [--tokens 256] [--decode 24]

Real Mixtral spreads a prompt's tokens over all 8 experts; the synthetic model's random attention
makes the hidden states of a prompt's tokens nearly equal after a few layers, so from layer 2 on
every token picks the same two experts. Prefill then streams ~2-3 experts a layer, not 8: its
absolute figures are flattered for every policy that streams (hybrid and dense offload alike).
The decode is the same: every token reads the same two experts a layer, so the cold rows a
hybrid's CPU reads come from 2 of 8 experts' cold sets (more reuse in the CPU's caches than real
routing gives), and the dense offload's CPU layers read the same 2 experts each token.
"""
import argparse

import torch

from hybridinfer import ffn as F
from hybridinfer.bench.decode_measure import decode, stepper
from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.workload import make_workload, synthetic_profile

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="M47 layers to build (CPU, q4_0)")
    ap.add_argument("--tokens", type=int, default=256, help="prompt length")
    ap.add_argument("--decode", type=int, default=24, help="greedy decode tokens after a 1-token start")
    a = ap.parse_args()
    torch.manual_seed(0)
    wl = make_workload("M47", a.layers, 0)
    b = build("cpu-sparse", wl, "cpu", torch.float32, torch.float32, None, synthetic_profile(wl),
              max(a.tokens, a.decode) + 8)
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
        prompt, counts[:] = list(counts), []
        cache, step = stepper(b.model, a.decode + 8, False)
        decode(step, a.decode)                    # bench decode's own greedy loop
    finally:
        F.route = route
    print(f"M47 x {a.layers} layers, top-2: token-slots per expert")
    print(f"a {a.tokens}-token prompt:")
    for layer, c in enumerate(prompt):
        print(f"  layer {layer}: {sorted(c, reverse=True)}  experts used: {sum(1 for v in c if v)}")
    print(f"{a.decode} decode tokens:")
    for layer in range(a.layers):
        c = [sum(col) for col in zip(*counts[layer::a.layers])]
        print(f"  layer {layer}: {sorted(c, reverse=True)}  experts used: {sum(1 for v in c if v)}")

if __name__ == "__main__":
    main()
