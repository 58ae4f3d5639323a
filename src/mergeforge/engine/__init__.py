"""The merge engine: recipe -> plan -> executor -> output folder, one way.

- :mod:`~mergeforge.engine.recipe`: mergekit's YAML schema, validated; parameter values per tensor.
- :mod:`~mergeforge.engine.plan` (with :mod:`~mergeforge.engine.jobs`, :mod:`~mergeforge.engine.layouts`,
  :mod:`~mergeforge.engine.rules`): one job per output tensor, from header entries and dtype names.
- :mod:`~mergeforge.engine.numpy_executor` and :mod:`~mergeforge.engine.torch_executor`: run a plan;
  :func:`~mergeforge.engine.api.choose_executor` picks one.
- :mod:`~mergeforge.engine.output`: the result, the dry-run listing and the output folder.
- :mod:`~mergeforge.engine.calibrate`: the calibration stage of data-aware methods.
- :mod:`~mergeforge.engine.materialize`: a task's model from an EMR or TALL-mask merge.
- :mod:`~mergeforge.engine.api`: the entry points, re-exported by :mod:`mergeforge`.

Importing this package imports nothing; users import from :mod:`mergeforge`.
"""
