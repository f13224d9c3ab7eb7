"""The benchmark's predictor: computes the real fc2 · relu(fc1 · x) in q4_0 (its cost is the cost a
TurboSparse predictor has), then returns a mask sampled from the FFN's fixed firing probabilities.

Why sampled: random weights do not fire with the published statistics, so the score cannot be the
mask; the statistics are what the benchmark is about (docs/BENCH_DECODE.md says this plainly).
The score is still computed, and the mask is made to depend on it (`score == score` is all-true
but is a real data dependency), so no work can be skipped.

Where it runs:
- fc1 is a row-dot GEMV over fc1t's bytes read as fc1 rows [rank, rb(d)] (the same 18-byte q4_0
  blocks, rank*d values either way; random weights, so only the byte count matters; an axpy over
  all of fc1^T has no zeros to skip): kernels/triton_ffn.matvec on cuda, kernels.cpu.linear on
  the CPU;
- fc2 is the hot half's transposed axpy over fc2t (y = sum_j a_j * W^T[j], rows with a_j = 0
  never read, so relu's zeros skip fc2 rows): triton_ffn.down on cuda (GPU q4_0 row layout);
  on the CPU fc1, relu and fc2 are one native call (kernels.cpu.relu_mlp_t);
- a model on cuda whose predictor the planner left on the CPU: x is copied to the host (a sync,
  counted in SYNCS), the mask goes back to the device.
Batches (prefill) dequantise the q4_0 rows (kernels.gpu.dequant) and use a matmul.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..kernels import cpu as cpu_kernels
from ..kernels.gpu import dequant, q4_rows_to_gpu
from .workload import FMT, SynthFFN


class Counters:
    """Host time blocked in the predictor's own copies, and their number (read by the harness)."""
    sync_s = 0.0
    syncs = 0


def _gemv_t_cuda(wt: torch.Tensor, cols: int, a: torch.Tensor) -> torch.Tensor:
    """y [cols] f32 = sum_j a[j] * W^T[j]: the hot half's axpy kernel; wt uint8 [rows, rb(cols)]
    in the GPU q4_0 row layout (kernels.gpu.q4_rows_to_gpu), a f32 [rows]."""
    from ..kernels import triton_ffn
    return triton_ffn.down(FMT, cols, wt, a)


class SynthPredictor(nn.Module):
    """active(x [n, d]) -> bool [n, n_ff] on x's device. threshold is kept for build code."""

    def __init__(self, ffn: SynthFFN, d: int, rank: int, device, seed: int):
        super().__init__()
        self.device = torch.device(device)
        self.d, self.rank, self.n_ff = d, rank, ffn.p.numel()
        # fc1t's bytes read as fc1 rows [rank, rb(d)] (the same q4_0 blocks, rank*d values either
        # way; random weights, so only the byte count matters): a row-dot GEMV, as a real
        # predictor computes fc1 (its transpose as an axpy ran at ~0.12 of copy on the H100)
        self.fc1 = ffn.fc1t.view(rank, -1)        # uint8 [rank, rb(d)]
        self.fc2t = ffn.fc2t                      # uint8 [rank, rb(n_ff)]
        if self.device.type == "cuda":            # the GPU row layout the Triton kernels read,
            # repacked on the CPU, moved once (a repack on the device leaves holes: HotFFN.to)
            self.fc1, self.fc2t = q4_rows_to_gpu(self.fc1), q4_rows_to_gpu(self.fc2t)
        self.fc1, self.fc2t = self.fc1.to(self.device), self.fc2t.to(self.device)
        self.p = ffn.p.to(self.device)            # float32 [n_ff]
        self.threshold = 0.0
        if self.device.type == "cpu":
            self._fc1 = cpu_kernels.PackedLinear(FMT, d, rank, self.fc1)
            self._fc2t = cpu_kernels.PackedLinear(FMT, self.n_ff, rank, self.fc2t)   # W2^T's rows
            self._rng = np.random.default_rng(seed % 2 ** 32)   # (seeds may be negative)
            # p in 16-bit fixed point: a neuron fires when a uniform 16-bit draw is below it
            # (probability p within 2^-16); the draws are the generator's raw 64-bit words cut
            # in four, ~3x cheaper than rng.random's floats (~25 us a layer at M7's 14336)
            self._p16 = np.minimum(np.round(self.p.numpy().astype(np.float64) * 65536), 65535).astype(np.uint16)

    @property
    def nbytes(self) -> int:
        return self.fc1.numel() + self.fc2t.numel()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [n, n_ff] = fc2 · relu(fc1 · x), x on self.device."""
        x = x.float()
        if x.shape[0] == 1 and self.device.type == "cuda":
            from ..kernels import triton_ffn
            h = torch.relu(triton_ffn.matvec(FMT, self.d, self.fc1, x[0].contiguous()))
            return _gemv_t_cuda(self.fc2t, self.n_ff, h)[None]
        if x.shape[0] == 1:
            return cpu_kernels.relu_mlp_t(x.reshape(-1), self._fc1, self._fc2t)[None]
        # a batch (2..16 tokens of a prompt in predictor mode): the rows dequantised once, by
        # the runtime's dequant (one Triton pass on cuda, not torch's float32 temporaries)
        gpu_layout = self.device.type == "cuda"
        fc1 = dequant(self.fc1, FMT, self.d, torch.float32, gpu_layout=gpu_layout)       # [rank, d]
        fc2t = dequant(self.fc2t, FMT, self.n_ff, torch.float32, gpu_layout=gpu_layout)  # [rank, n_ff]
        return torch.relu(x @ fc1.T) @ fc2t

    @staticmethod
    def slots(preds: list["SynthPredictor"], k: int, device) -> "SynthSlots":
        """The masks of a layer's experts' predictors with the experts chosen on the device."""
        return SynthSlots(preds, k, device)

    def active(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        if dev != self.device:                     # a CPU predictor in a GPU model: one round trip
            t = time.perf_counter()
            x = x.to(self.device)
            Counters.sync_s += time.perf_counter() - t
            Counters.syncs += 1
        s = self.scores(x)
        # cpu: numpy's generator (seeded per predictor; a few small ops on n_ff values cost ~4x
        # less than torch's); cuda: the default generator (seeded by the harness): it is
        # CUDA-graph safe, a private generator is not
        if self.device.type == "cpu":
            sn = s.numpy()
            n = x.shape[0] * self.n_ff
            u = self._rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]
            m = u.reshape(x.shape[0], self.n_ff) < self._p16
            m &= sn == sn                           # all-true; keeps the score a real input
            mask = torch.from_numpy(m)
        else:
            mask = torch.rand(x.shape[0], self.n_ff, device=self.device) < self.p
            mask &= s == s
        return mask.to(dev, non_blocking=True) if dev != self.device else mask


def _sample_kernel():
    """The Triton kernel of SynthSlots' mask (built on first use: triton is imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def sample(s_ptr, p_ptr, sel_ptr, out_ptr, ctr_ptr, N, BLOCK: tl.constexpr):
        """out[s, j] = (uniform < p[sel[s], j]) & (score == score) for slot s = program_id(1);
        uniforms by Philox from a device counter ctr[0], advanced once per launch by the last
        program to finish (its ticket in ctr[1]), so CUDA-graph replays draw fresh masks."""
        s = tl.program_id(1)
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = j < N
        seed = tl.load(ctr_ptr)
        e = tl.load(sel_ptr + s)
        sv = tl.load(s_ptr + s * N + j, mask=m, other=0.0)
        pv = tl.load(p_ptr + e * N + j, mask=m, other=0.0)
        fire = (tl.rand(seed, s * N + j) < pv) & (sv == sv)
        tl.store(out_ptr + s * N + j, fire.to(tl.int8), mask=m)
        nprog = tl.num_programs(0) * tl.num_programs(1)
        ticket = tl.atomic_add(ctr_ptr + 1, 1, sem="acq_rel")    # after this program's seed read
        if ticket == nprog - 1:                                    # the last: next launch's seed
            tl.store(ctr_ptr, seed + 1)
            tl.store(ctr_ptr + 1, 0)
    return sample


_SAMPLE = []


class SynthSlots:
    """masks(x, sel, out): out[s] = SynthPredictor sel[s]'s mask (bool [k, n_ff]) with sel the
    router's choice on the device (the graph decoder's fused layer). CUDA: the scores by two
    device-selected launches for all slots (fc1 as a GEMV with x shared, fc2^T's axpy over
    relu(h), relu applied inside it), then one kernel samples the mask from the chosen experts'
    firing probabilities (four kernels in all, with the zeroing of the scores); elsewhere a
    loop over the slots."""

    def __init__(self, preds: list[SynthPredictor], k: int, device):
        self.preds = preds
        self.tk = None
        p0 = preds[0]
        if torch.device(device).type == "cuda":
            from ..kernels import triton_ffn as tk
            self.tk = tk
            self.t1 = tk.RowTable.build(FMT, p0.d, [p.fc1 for p in preds], device)    # [rank] rows
            self.t2 = tk.RowTable.build(FMT, p0.n_ff, [p.fc2t for p in preds], device)   # [rank] rows
            self.h = torch.zeros(k, p0.rank, device=device)
            self.s = torch.zeros(k, p0.n_ff, device=device)
            self.p = torch.stack([p.p for p in preds])                  # [E, n_ff] f32
            self.k, self.n_ff = k, p0.n_ff
            # [seed, tickets]: the seed from the harness's generator (seeded), then advanced
            # on the device once per call
            seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
            self.ctr = torch.tensor([seed, 0], dtype=torch.int32, device=device)
            if not _SAMPLE:
                _SAMPLE.append(_sample_kernel())

    def masks(self, x: torch.Tensor, sel: torch.Tensor, out: torch.Tensor) -> None:
        """x [1, d] float32, sel int64 [k], out bool [k, n_ff] (written)."""
        if self.tk is None:
            for s, e in enumerate(sel.tolist()):
                out[s] = self.preds[e].active(x)[0]
            return
        p0 = self.preds[0]
        self.tk.matvec_slots(FMT, p0.d, self.t1, x[0], 0, self.h, sel)
        self.s.zero_()
        self.tk.down_slots(FMT, p0.n_ff, self.t2, self.h, p0.rank, self.s, p0.n_ff, sel,
                           relu_a=True)
        block = 1024
        _SAMPLE[0][((self.n_ff + block - 1) // block, self.k)](
            self.s, self.p, sel, out.view(torch.int8), self.ctr, self.n_ff, BLOCK=block)
