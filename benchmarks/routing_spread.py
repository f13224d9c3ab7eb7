"""How the synthetic M47 workload (bench decode) routes tokens: per layer, token-slots per expert
of a prompt, and of a decode as bench decode runs it.

    python benchmarks/routing_spread.py [--layers 4] [--tokens 256] [--decode 24] [--intermediate N]

Real Mixtral spreads a prompt's tokens over all 8 experts. Until session 7 the synthetic model did
not: from layer 2 on every token picked the same two experts (results/routing_spread_M47_cpu.txt)
because (1) uniform random q4_0 nibbles average -0.5, a bias every FFN row shares, which put one
common vector into every token's residual stream; (2) near-uniform attention (small q/k) averaged
the context into every token, a common part that grew each layer; (3) greedy decoding of random
weights loops over a few tokens. Now: zero-mean nibbles, peaked attention (q/k weights x3, o_proj
x0.5) and decode tokens shifted by a seeded random offset (bench/workload.py, decode_measure.py).

`--intermediate N` builds the experts N neurons wide (not M47's 14336) so that all 32 layers fit
on the dev VM: routing depends on the residual stream, to which the FFNs add a small part.
"""
import argparse

import torch

from hybridinfer import ffn as F
from hybridinfer.bench.decode_measure import decode, stepper
from hybridinfer.bench.decode_policies import build
from hybridinfer.bench.workload import SHAPES, make_workload, synthetic_profile

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="M47 layers to build (CPU, q4_0)")
    ap.add_argument("--tokens", type=int, default=256, help="prompt length")
    ap.add_argument("--decode", type=int, default=24, help="decode tokens after a 1-token start")
    ap.add_argument("--intermediate", type=int, default=None,
                    help="experts' width (default M47's 14336; e.g. 1024 to fit 32 layers in RAM)")
    a = ap.parse_args()
    torch.manual_seed(0)
    shape = "M47"
    if a.intermediate:                            # a proxy shape: M47 with narrower experts
        shape = f"M47-ff{a.intermediate}"
        SHAPES[shape] = dict(SHAPES["M47"], intermediate_size=a.intermediate)
    wl = make_workload(shape, a.layers, 0)
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
        decode(step, a.decode)                    # bench decode's own decode loop
    finally:
        F.route = route
    print(f"{shape} x {a.layers} layers, top-2: token-slots per expert")
    print(f"a {a.tokens}-token prompt:")
    for layer, c in enumerate(prompt):
        print(f"  layer {layer}: {sorted(c, reverse=True)}  experts used: {sum(1 for v in c if v)}")
    print(f"{a.decode} decode tokens:")
    for layer in range(a.layers):
        c = [sum(col) for col in zip(*counts[layer::a.layers])]
        print(f"  layer {layer}: {sorted(c, reverse=True)}  experts used: {sum(1 for v in c if v)}")

if __name__ == "__main__":
    main()
