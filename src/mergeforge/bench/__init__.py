"""The offline merging benchmark: every registered method over the zoo's experts (``mergeforge bench``).

Kept import-light: ``from mergeforge.bench.runner import run_bench`` loads torch when needed.
"""
