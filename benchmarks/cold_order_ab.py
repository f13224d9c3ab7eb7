"""bench decode with every policy built and measured twice in one process: first with its cold
rows by neuron id (build.split_rows without the profile's frequencies: the order before session
12), then as shipped (descending firing counts). Same arguments as `python -m hybridinfer.bench.decode`:

    python3 benchmarks/cold_order_ab.py --shape M47 --threads 8 --vram-budget 8GiB 24GiB \
        --policies hybrid dense-offload --prefill 0

Dense policies never order their rows (they read them all), so their two runs are a control of
the run-to-run noise. Both results are printed; the JSON keeps the id-order figures under "ab_off".
"""
import gc
import sys

import torch

import hybridinfer.bench.decode as decode
import hybridinfer.bench.decode_policies as policies

KEYS = ("tok_s", "ms_token", "split_ms", "x_roofline")
SPLIT = policies.split_rows


def by_id(n_ff, hot_ids, warm_ids=(), what="", freq=None):
    """build.split_rows without the frequencies: the cold rows after the warm ones by id."""
    return SPLIT(n_ff, hot_ids, warm_ids, what)


def main(argv=None) -> int:
    one = decode._one

    def both(name, budget, label, *rest):
        policies.split_rows = by_id
        try:
            off = one(name, budget, label, *rest)
        finally:
            policies.split_rows = SPLIT
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        on = one(name, budget, label, *rest)
        for tag, r in (("id order", off), ("by frequency", on)):
            print(f"A/B {name}@{label} {tag}:", {k: r.get(k) for k in KEYS}, flush=True)
        on["ab_off"] = {k: off.get(k) for k in KEYS}
        return on
    decode._one = both
    return decode.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
