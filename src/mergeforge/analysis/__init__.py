"""Foundations: why a merge works, before making it.

- ``stats``: streaming task-vector statistics (cosines, norms, sign conflicts, DARE's rescale,
  spectra and subspace alignment) and the ``mergeforge analyze`` report;
- ``lmc``: loss and accuracy along the line between two models (linear mode connectivity);
- ``align``: permutation alignment of one model to another (``mergeforge align``).
"""
