"""Benchmarks (`hybridinfer bench ...`): each measures, prints a short table and writes JSON.

machine.py: machine info and the STREAM-like read bandwidth (shared by all benchmarks).
kernels.py: workload K, the CPU sparse FFN kernels against the read bandwidth.
"""
