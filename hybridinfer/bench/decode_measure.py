"""Measuring one built policy: decode tokens/s, the ms/token split, prefill, memory; and the
roofline's inputs (CPU read bandwidth, GPU bandwidth, sync latency) measured in the same run.

The split of one token's wall time (host view; the columns but GPU add up to the wall time):
  cpu     time inside the CPU kernels (native calls: FFN halves, CPU predictors), plus, for a
          model on the CPU, torch's own ops (attention, router, lm_head: aten self time)
  sync    time the host is blocked: D2H/H2D copies of the hybrid split, the router's expert ids,
          the sampled token, a CPU predictor's round trip (waits include unfinished GPU work)
  python  the rest: interpreter, torch dispatch and kernel launches (what CUDA graphs remove)
  gpu     GPU busy time (union of kernel and copy intervals, torch.profiler), overlapping the rest
cpu and sync come from a pass with timers around those calls; gpu and aten times from a short
profiled pass; python = clean wall time - cpu - sync (never below 0).
The chained graph decoder (graphs.py) runs the cold halves on a service thread while the main
thread enqueues the token's graphs and then blocks: there python is the main thread's time outside
its waits (graph launches, interpreter), cpu the service thread's time in the cold steps (within
the main thread's blocked time), sync the rest of the blocked time; its flag waits are counted as
syncs.
"""
from __future__ import annotations

import contextlib
import os
import random
import statistics
import time

import torch

from ..generate import decode_one_token
from ..kernels import cpu as cpu_k
from ..kernels import cpu_step
from ..kernels import gpu as gpu_k
from . import machine
from .synth_predictor import Counters, SynthPredictor


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def gpu_bandwidth(device, nbytes: int = 2 << 30, repeat: int = 10) -> float | None:
    """GB/s of a large device-to-device copy, bytes read + written (METHOD.md's ceiling)."""
    if torch.device(device).type != "cuda":
        return None
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeat):
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / best / 1e9


def pcie_bandwidth(device, nbytes: int = 256 << 20, repeat: int = 8) -> float | None:
    """GB/s of a page-locked host -> device copy (the link the warm tier's zero-copy reads use)."""
    if torch.device(device).type != "cuda":
        return None
    a = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    b = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeat):
        s.record()
        b.copy_(a, non_blocking=True)
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return nbytes / best / 1e9


def sync_latency(device, repeat: int = 200) -> float | None:
    """Median seconds of a tiny D2H copy + synchronize (gpu.to_host, as the runtime does it)."""
    if torch.device(device).type != "cuda":
        return None
    x = torch.zeros(8, device=device)
    gpu_k.to_host(x)
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        gpu_k.to_host(x)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def roofline_inputs(threads: int, device) -> dict:
    bw = machine.read_bandwidth(threads)
    machine.release_buffer()
    return {"cpu_read_gbs": bw, "gpu_copy_gbs": gpu_bandwidth(device), "sync_s": sync_latency(device),
            "pcie_gbs": pcie_bandwidth(device), "threads": threads}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread_token(logits, rng: random.Random) -> int:
    """The next token of a benchmark decode: the argmax (read: the real sync of sampling) shifted
    by a seeded uniform offset. Greedy decoding of random weights settles into a loop of a few
    tokens, which would route every token to the same experts (benchmarks/routing_spread.py)."""
    return int(spread(logits, rng.randrange(logits.shape[-1])))


def spread(logits, offset):
    """(argmax + offset) mod vocab, on the logits' device (no host read): spread_token's choice,
    and the run-ahead decode's select with the offsets drawn beforehand from the same RNG."""
    return (logits.argmax() + offset) % logits.shape[-1]


@torch.inference_mode()
def decode(step, n: int, token: int = 1, waits: list | None = None, seed: int = 0) -> list[float]:
    """Decode n tokens with step(token) -> logits, seconds per token; `waits` gets the seconds
    each token's argmax waited (the host blocked until the device finished the token: a sync,
    not Python); the next token is spread_token's. A graph decoder that can run ahead
    (GraphDecoder.stream) chooses the same tokens on the device, one token ahead: seconds per
    token are then the intervals between tokens read, and its waits are its own (counted by
    the _Timers as syncs), not in `waits`."""
    rng = random.Random(seed)
    dec = getattr(step, "__self__", None)
    if getattr(dec, "can_run_ahead", False):
        vocab = dec.logits.shape[-1]
        offs = torch.tensor([rng.randrange(vocab) for _ in range(n)], device=dec.logits.device)
        out, t = [], time.perf_counter()
        for _ in dec.stream(token, n, lambda logits, i: spread(logits, offs[i])):
            t1 = time.perf_counter()
            out.append(t1 - t)
            t = t1
        return out
    out = []
    for _ in range(n):
        t = time.perf_counter()
        logits = step(token)
        t1 = time.perf_counter()
        token = spread_token(logits, rng)
        t2 = time.perf_counter()
        out.append(t2 - t)
        if waits is not None:
            waits.append(t2 - t1)
    return out


def stepper(model, capacity: int, graphs: bool):
    """(cache, step): the CUDA-graph decoder on a GPU when `graphs`, else plain eager decode."""
    if graphs and model.device.type == "cuda":
        from ..graphs import GraphDecoder
        gd = GraphDecoder(model, capacity)
        return gd.cache, gd.step
    cache = model.new_cache(capacity)
    return cache, lambda tok: decode_one_token(model, tok, cache)


class _Timers:
    """Wraps the runtime's CPU kernel entry points and host<->device copies with timers; each
    HybridMoE's router gets an explicit synchronize (the ids' .tolist() syncs there anyway).
    `parts` splits the time further: "ffn" (FFN kernels), "linear" (dense linears: attention
    projections, lm_head), "predictor" (the benchmark predictor's whole call, its own kernels
    included and not counted under linear/fc2)."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.cpu = self.sync = 0.0
        self.chain_cpu = 0.0               # the chained decoder's service thread, in cold steps
        self.syncs = 0
        self.parts = {"ffn": 0.0, "linear": 0.0, "predictor": 0.0}
        self.calls = {"ffn": 0, "linear": 0, "predictor": 0}     # timed calls per part
        self._in_pred = 0

    def _timer(self, orig, field, part=None):
        """orig wrapped: its seconds added to `field` (and to parts[part], outside a predictor)."""
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                dt = time.perf_counter() - t
                setattr(self, field, getattr(self, field) + dt)
                if part is not None and not self._in_pred:
                    self.parts[part] += dt
                    self.calls[part] += 1
        return timed

    def _wrap(self, mod, name, field, part=None):
        orig = getattr(mod, name)
        setattr(mod, name, self._timer(orig, field, part))
        self._undo.append(lambda: setattr(mod, name, orig))

    def _wrap_cpu_plan(self):
        """A CPU model's bound decode plan (model._cpu_plan) holds each layer's native attention
        call itself (not AttnStep.run_trusted): time those entries in place, restored on exit."""
        plan = getattr(self.model, "_plan", (None, None))[1]
        if not plan:
            return
        orig = list(plan)
        plan[:] = [(self._timer(e[0], "cpu", "linear"), *e[1:]) for e in orig]
        self._undo.append(lambda: plan.__setitem__(slice(None), orig))

    def _wrap_static(self, cls, name, field):
        """_wrap for a staticmethod of cls (restored as a staticmethod)."""
        orig = cls.__dict__[name].__func__

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - t)
        setattr(cls, name, staticmethod(timed))
        self._undo.append(lambda: setattr(cls, name, staticmethod(orig)))

    def _wrap_predictor(self):
        orig = SynthPredictor.active

        def timed(pred, *a, **k):
            t = time.perf_counter()
            self._in_pred += 1
            try:
                return orig(pred, *a, **k)
            finally:
                self._in_pred -= 1
                self.parts["predictor"] += time.perf_counter() - t
        SynthPredictor.active = timed
        self._undo.append(lambda: setattr(SynthPredictor, "active", orig))

    def __enter__(self):
        self._undo = []
        self._wrap(cpu_k, "ffn_sparse_multi", "cpu", "ffn")
        self._wrap(cpu_step.ColdStep, "run", "cpu", "ffn")        # the graph decoder's cold halves
        self._wrap(cpu_k, "down_sparse", "cpu")
        self._wrap(cpu_k, "linear", "cpu", "linear")
        # a CPU model's decode step: the attention half (its linears, attention, norms) in one
        # call, and the benchmark predictor's fc1 + fc2 (counted under "predictor")
        self._wrap(cpu_step.AttnStep, "run_trusted", "cpu", "linear")
        self._wrap(cpu_k, "relu_mlp_t", "cpu")
        self._wrap_cpu_plan()
        self._wrap_predictor()
        self._wrap(gpu_k, "to_host", "sync")
        self._wrap(gpu_k, "to_device", "sync")
        from ..graphs import GraphDecoder
        for name in ("_wait", "_join_chain"):     # the decoder's host waits (staticmethods)
            self._wrap_static(GraphDecoder, name, "sync")
        self._s0 = (gpu_k.SyncCounter.syncs, Counters.sync_s, Counters.syncs,
                    cpu_step.ColdChain.busy_s, cpu_step.ColdChain.waits)
        if self.device.type == "cuda":
            for blk in self.model.blocks:
                if hasattr(blk.ffn, "route"):
                    orig = blk.ffn.route

                    def route(x, _orig=orig):
                        out = _orig(x)
                        t = time.perf_counter()
                        torch.cuda.synchronize(self.device)
                        self.sync += time.perf_counter() - t
                        self.syncs += 1
                        return out
                    blk.ffn.route = route
                    self._undo.append(lambda f=blk.ffn: f.__dict__.pop("route", None))
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo):     # each a callable restoring what was wrapped
            undo()
        self.syncs += gpu_k.SyncCounter.syncs - self._s0[0] + Counters.syncs - self._s0[2]
        self.sync += Counters.sync_s - self._s0[1]
        self.chain_cpu = cpu_step.ColdChain.busy_s - self._s0[3]
        self.syncs += cpu_step.ColdChain.waits - self._s0[4]


def _intervals_union(iv: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for a, b in sorted(iv):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profiled(step, n: int, device) -> dict:
    """GPU busy seconds and aten self CPU seconds per token over n profiled tokens."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        decode(step, n)
        _sync(device)
    gpu, aten = [], 0.0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            gpu.append((ev.time_range.start, ev.time_range.end))
        elif ev.name.startswith("aten::"):
            aten += ev.self_cpu_time_total
    return {"gpu_s": _intervals_union(gpu) / 1e6 / n, "aten_s": aten / 1e6 / n}


def measure(built, warmup: int, tokens: int, prefill: int, context: int, profile_tokens: int = 4,
            graphs: bool = True) -> dict:
    """Everything `bench decode` reports for one policy (decode through CUDA graphs on a GPU
    unless graphs=False)."""
    model, dev = built.model, built.device
    need = warmup + 2 * tokens + profile_tokens + 1
    cache, step = stepper(model, max(context, need), graphs)
    dec = getattr(step, "__self__", None)          # the GraphDecoder, when decoding through one
    warm_layers = getattr(dec, "warm_layers", 0)   # layers whose warm rows the GPU reads
    ahead = getattr(dec, "can_run_ahead", False)     # decode() runs it a token ahead
    decode(step, warmup)
    _sync(dev)
    secs = decode(step, tokens)
    waits: list[float] = []
    with _Timers(model, dev) as tm:
        inst = decode(step, tokens, waits=waits)
        _sync(dev)
    tm.sync += sum(waits)
    prof = profiled(step, profile_tokens, dev)
    wall = statistics.median(secs)
    cpu_s = tm.cpu / tokens
    sync_s = tm.sync / tokens
    if tm.chain_cpu:           # a service thread's cold halves, inside the main thread's waits
        chain_s = min(tm.chain_cpu / tokens, sync_s)
        cpu_s, sync_s = cpu_s + chain_s, sync_s - chain_s
    if dev.type == "cpu":      # torch ops of a model on the CPU are CPU compute (profiled: capped)
        cpu_s = min(cpu_s + prof["aten_s"], max(wall - sync_s, 0.0))
    host_s = max(0.0, wall - cpu_s - sync_s)          # the main thread outside its waits
    # run ahead, the host's work overlaps the device's (it enqueues the next token meanwhile, and
    # blocks in launches once the queue is full): what it costs the token is the time the
    # device had nothing to run, wall - GPU busy
    py_s = max(0.0, wall - prof["gpu_s"]) if ahead and dev.type == "cuda" else host_s
    out = {"tok_s": 1.0 / wall, "ms_token": wall * 1e3, "ms_token_mean": statistics.mean(secs) * 1e3,
           "ms_instrumented": statistics.median(inst) * 1e3,
           "split_ms": {"gpu": prof["gpu_s"] * 1e3, "cpu": cpu_s * 1e3, "sync": sync_s * 1e3,
                        "python": py_s * 1e3, "host": host_s * 1e3},
           # + the argmax read a token, unless the decoder ran ahead (its reads are counted)
           "syncs_per_token": (tm.syncs + (tokens if dev.type == "cuda" and not ahead else 0)) / tokens,
           # instrumented pass, ms/token: kernels by role; "rest" = its wall - those (torch ops
           # such as the attention maths and norms, interpreter, copies)
           "parts_ms": dict({k: v / tokens * 1e3 for k, v in tm.parts.items()},
                            rest=(sum(inst) - sum(tm.parts.values())) / tokens * 1e3,
                            aten=prof["aten_s"] * 1e3),
           "context_mean": warmup + tokens * 1.5, "warm_layers": warm_layers, "run_ahead": ahead}
    del cache, step
    if prefill:
        out["prefill_tok_s"] = _prefill(model, prefill, dev)
    return out


@torch.inference_mode()
def _prefill(model, n: int, dev, prompts: int = 3) -> float:
    """tokens/s of an n-token prompt: the median of `prompts` prompts (fresh random tokens, so
    the experts' token counts differ) after a warm-up prompt of the same length (which compiles
    the kernels' specialisations a prompt meets: a 16-token warm-up left Triton compiling inside
    the timed prompt). One prompt was too noisy: on the H100, dense offload's four successive
    512-token prompts took 130-246 ms."""
    g = torch.Generator().manual_seed(5)
    times = []
    for _ in range(prompts + 1):
        ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=g).to(dev)
        cache = model.new_cache(n + 1)
        _sync(dev)
        t = time.perf_counter()
        model(ids, cache, last_only=True)
        _sync(dev)
        times.append(time.perf_counter() - t)
        del cache
    return n / statistics.median(times[1:])


@contextlib.contextmanager
def vram_cap(device, budget: int | None):
    """Cap torch's allocator at the budget (set_per_process_memory_fraction) and track the peak."""
    dev = torch.device(device)
    if dev.type != "cuda":
        yield {}
        return
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    if budget is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), dev)
    info = {}
    try:
        yield info
    finally:
        info["peak_vram"] = torch.cuda.max_memory_allocated(dev)
        info["peak_vram_reserved"] = torch.cuda.max_memory_reserved(dev)
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
