"""kernels.cpu_step.ColdStep: the decode step's native cold half (router choice + masks -> cold-row ids
-> fused CPU FFNs), against the float64 reference of test_kernels_cpu on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from hybridinfer.kernels import cpu, cpu_step
from test_kernels_cpu import assert_within, make_ffn, reference


def _setup(seed, E=4, n_ff=96, d=64, k=2):
    g = torch.Generator().manual_seed(seed)
    ffns, neurons, masks = [], [], []
    for e in range(E):
        if e == 1:                                          # an expert with no cold rows
            ffns.append(None), neurons.append(None), masks.append(None)
            continue
        n_cold = int(torch.randint(1, n_ff, (1,), generator=g))
        ffns.append(make_ffn("q4_0" if e % 2 == 0 else "f16", d, n_cold, seed=seed * 10 + e))
        neurons.append(torch.randperm(n_ff, generator=g)[:n_cold])          # int64 like cold_ids
        masks.append(torch.zeros(n_ff, dtype=torch.bool))
    x = torch.zeros(d)
    y = torch.full((d,), float("nan"))
    sel = torch.zeros(k, dtype=torch.int64)
    w = torch.zeros(k)
    return ffns, neurons, masks, x, y, sel, w, g


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cold_step_matches_reference(seed):
    ffns, neurons, masks, x, y, sel, w, g = _setup(seed)
    cs = cpu_step.ColdStep(ffns, neurons, masks, x, y, sel, w, "drelu")
    for step in range(4):                                   # buffers refilled in place per step
        _fill((cs, ffns, neurons, masks, x, y, sel, w, g))
        cs.run()
        ref, bound, rows = torch.zeros(x.numel(), dtype=torch.float64), 0, 0
        chosen = []
        for s, e in enumerate(sel.tolist()):
            if ffns[e] is None:
                continue
            ids = torch.nonzero(masks[e][neurons[e]]).flatten()     # cold rows predicted active
            rows += ids.numel()
            chosen.append((ffns[e], ids.int(), float(w[s])))
            r, b = reference(ffns[e], x[None], ids, "drelu", scale=w[s:s + 1].double())
            ref, bound = ref + r[0], bound + b[0]
        assert cs.last_rows == rows
        assert_within(y, ref, bound if rows else 1e-30, f"step {step}")
        if chosen:                      # the same call the Python path made: identical bits
            f, i, sc = zip(*chosen)
            assert torch.equal(y, cpu.ffn_sparse_multi(f, x, i, list(sc), "drelu"))


def test_cold_step_dense_layer_without_masks():
    ffns, neurons, _, x, y, _, _, g = _setup(4)
    x.copy_(torch.randn(x.shape, generator=g))
    cs = cpu_step.ColdStep(ffns[:1], neurons[:1], [None], x, y)    # no router, every cold row
    cs.run()
    ref, bound = reference(ffns[0], x[None], torch.arange(ffns[0].n_ff), "drelu")
    assert cs.last_rows == ffns[0].n_ff
    assert_within(y, ref[0], bound[0])


def test_cold_step_errors_are_one_line():
    ffns, neurons, masks, x, y, sel, w, _ = _setup(5)
    with pytest.raises(ValueError, match="exactly one FFN"):
        cpu_step.ColdStep(ffns, neurons, masks, x, y)
    with pytest.raises(ValueError, match="outside the mask"):
        cpu_step.ColdStep(ffns, neurons, [m[:3] if m is not None else None for m in masks], x, y, sel, w)
    with pytest.raises(ValueError, match="float32"):
        cpu_step.ColdStep(ffns, neurons, masks, x.double(), y, sel, w)
    cs = cpu_step.ColdStep(ffns, neurons, masks, x, y, sel, w)
    sel.fill_(len(ffns))                                         # a corrupt router buffer
    with pytest.raises(ValueError, match="out of range"):
        cs.run()


def test_cold_step_slot_masks_equal_per_expert_masks():
    """Masks per slot (row s: the s-th chosen expert's, as the device-selected decoder copies
    them) give the same bits as the same masks bound per expert."""
    ffns, neurons, masks, x, y, sel, w, g = _setup(6)
    k, n_ff = sel.numel(), masks[0].numel()
    slot = torch.zeros(k, n_ff, dtype=torch.bool)
    y2 = torch.zeros_like(y)
    per_expert = cpu_step.ColdStep(ffns, neurons, masks, x, y, sel, w, "drelu")
    per_slot = cpu_step.ColdStep(ffns, neurons, [None] * len(ffns), x, y2, sel, w, "drelu",
                            slot_masks=slot)
    for _ in range(4):
        x.copy_(torch.randn(x.shape, generator=g))
        sel.copy_(torch.randperm(len(ffns), generator=g)[:k])
        w.copy_(torch.rand(k, generator=g))
        for s, e in enumerate(sel.tolist()):
            m = torch.rand(n_ff, generator=g) < 0.4
            slot[s] = m
            if masks[e] is not None:
                masks[e].copy_(m)
        per_expert.run()
        per_slot.run()
        assert per_slot.last_rows == per_expert.last_rows
        assert torch.equal(y, y2)
    with pytest.raises(ValueError, match="replaces the per-expert masks"):
        cpu_step.ColdStep(ffns, neurons, masks, x, y2, sel, w, slot_masks=slot)
    with pytest.raises(ValueError, match="outside the slot masks"):
        cpu_step.ColdStep(ffns, neurons, [None] * len(ffns), x, y2, sel, w, slot_masks=slot[:, :3].contiguous())
    with pytest.raises(ValueError, match="rows for 2 slots"):
        cpu_step.ColdStep(ffns, neurons, [None] * len(ffns), x, y2, sel, w, slot_masks=slot[:1].contiguous())


def _chain_layers(seed, n=3):
    """n layers' ColdSteps on their own buffers, and their int32 flags [2, n]."""
    layers = []
    for i in range(n):
        ffns, neurons, masks, x, y, sel, w, g = _setup(seed * 7 + i)
        layers.append((cpu_step.ColdStep(ffns, neurons, masks, x, y, sel, w, "drelu"),
                       ffns, neurons, masks, x, y, sel, w, g))
    return layers, torch.zeros(2, n, dtype=torch.int32)


def _fill(layer):
    _, ffns, _, masks, x, _, sel, w, g = layer
    x.copy_(torch.randn(x.shape, generator=g))
    sel.copy_(torch.randperm(len(ffns), generator=g)[:2])
    w.copy_(torch.rand(2, generator=g))
    for m in masks:
        if m is not None:
            m.copy_(torch.rand(m.shape, generator=g) < 0.4)


@pytest.mark.parametrize("seed", [1, 2])
def test_cold_chain_serves_layers_in_order(seed):
    """The main thread plays the device: per layer it fills the inputs, sets ready, waits for
    done (as the device does: reset on read); the chain's thread must have run that layer's
    step by then with those inputs: y equals a plain ColdStep.run on the same buffers."""
    layers, flags = _chain_layers(seed)
    chain = cpu_step.ColdChain([lay[0] for lay in layers], list(flags[0]), list(flags[1]))
    waits0, busy0 = cpu_step.ColdChain.waits, cpu_step.ColdChain.busy_s     # class-wide totals
    for token in range(3):
        chain.begin()
        for i, lay in enumerate(layers):
            _fill(lay)
            flags[0, i] = 1                                         # ready
            assert cpu_step.wait_flag(flags[1, i], timeout=5.0)          # done, reset
            got = lay[5].clone()
            lay[0].run()                                            # the same step, again
            assert torch.equal(got, lay[5]), f"token {token} layer {i}"
        chain.end()
        assert int(flags.abs().sum()) == 0                          # every flag consumed
    assert cpu_step.ColdChain.waits - waits0 == 9 and cpu_step.ColdChain.busy_s > busy0


def test_cold_chain_error_unblocks_the_device_and_raises():
    layers, flags = _chain_layers(3)
    chain = cpu_step.ColdChain([lay[0] for lay in layers], list(flags[0]), list(flags[1]))
    chain.begin()
    _fill(layers[0])
    layers[0][6].fill_(99)                                          # corrupt expert id
    flags[0, 0] = 1
    for i in range(3):          # the device is never stalled: done comes for every layer
        assert cpu_step.wait_flag(flags[1, i], timeout=5.0)
        assert torch.count_nonzero(layers[i][5]) == 0               # y zeroed
    with pytest.raises(ValueError, match="out of range"):
        chain.end()


def test_cold_chain_timeout_and_cancel():
    layers, flags = _chain_layers(4, n=2)
    chain = cpu_step.ColdChain([lay[0] for lay in layers], list(flags[0]), list(flags[1]),
                          timeout=0.05)
    chain.begin()                                                   # no ready ever comes
    with pytest.raises(RuntimeError, match="did not signal link 0"):
        chain.end()
    assert flags[1].tolist() == [1, 1]                              # the device would go on
    flags.zero_()
    chain2 = cpu_step.ColdChain([lay[0] for lay in layers], list(flags[0]), list(flags[1]))
    chain2.begin()
    chain2.end(cancel=True)                                         # returns, raises nothing
    assert not cpu_step.wait_flag(flags[0, 0], timeout=0.01)             # nothing set ready
    with pytest.raises(ValueError, match="one ready and one done"):
        cpu_step.ColdChain([layers[0][0]], [flags[0, 0]], [])
    with pytest.raises(ValueError, match="int32"):
        cpu_step.ColdChain([layers[0][0]], [flags[0, 0].long()], [flags[1, 0]])


def test_cold_chain_two_tokens_in_flight():
    """Run-ahead: token t+1 begins before token t ends. The thread serves the tokens in order,
    each end() waits for the oldest, an error stays with its own token, and a third begin()
    while two are in flight is refused."""
    layers, flags = _chain_layers(5, n=2)
    chain = cpu_step.ColdChain([lay[0] for lay in layers], list(flags[0]), list(flags[1]))

    def play_token(corrupt=False):               # the device's side of one token
        for i, lay in enumerate(layers):
            _fill(lay)
            if corrupt:                           # an expert id out of range: the thread
                lay[6].fill_(99)                  # unblocks every later link of the token
            if not corrupt or i == 0:
                flags[0, i] = 1
            assert cpu_step.wait_flag(flags[1, i], timeout=5.0)
            got = lay[5].clone()
            if corrupt:
                assert torch.count_nonzero(got) == 0      # y zeroed
            else:
                lay[0].run()                              # the same step, again
                assert torch.equal(got, lay[5])

    chain.begin()
    chain.begin()
    with pytest.raises(RuntimeError, match="in flight"):
        chain.begin()
    play_token(corrupt=True)                      # token 1 fails: y zeroed, the device goes on
    play_token()                                  # token 2 is served normally
    with pytest.raises(ValueError, match="out of range"):
        chain.end()                               # token 1's error
    chain.end()                                   # token 2: no error
    chain.end()                                   # nothing in flight: returns
    assert int(flags.abs().sum()) == 0
    chain.begin()                                 # usable again; cancel ends all in flight
    chain.begin()
    chain.end(cancel=True)
    flags.zero_()
    chain.begin()
    play_token()
    chain.end()
