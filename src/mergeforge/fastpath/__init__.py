"""The torch-free fast path: merges that need no torch at all run on NumPy, with the same kernels
(:mod:`mergeforge.fastpath.kernels`) that the torch methods use on CPU.

This package imports nothing heavy at top level.
"""
