"""The calibration stage of data-aware merge methods.

Fisher merging (Matena & Raffel 2022, arXiv:2111.09832), RegMean (Jin et al. 2023,
arXiv:2212.09849) and AdaMerging (Yang et al. 2024, arXiv:2310.02575) need forward or backward
passes through whole models before any tensor can be merged. This package runs them once, before
the streaming merge, and hands each output tensor its statistics:

- :mod:`~mergeforge.calibration.data`: reads the recipe's ``calibration:`` data (JSONL or task
  folders) and turns it into padded token batches;
- :mod:`~mergeforge.calibration.context`: loads the models (from disk or from state dicts), runs a
  method's ``calibrate`` hook and attaches the statistics to the plan's jobs;
- :mod:`~mergeforge.calibration.fisher`, :mod:`~mergeforge.calibration.gram`,
  :mod:`~mergeforge.calibration.adamerging`: the statistic collectors.

Nothing here is imported at package import time, so ``mergeforge --help`` stays free of torch.
"""
