"""Kernels: the only place that touches native code and GPU kernels.

cpu.py wraps the C++ module hybridinfer._C (sparse FFN on the CPU); gpu.py holds the GPU side.
Import the submodule you need: `from hybridinfer.kernels import cpu`.
"""
