"""The task format, upstream of everything that reads or writes tasks (the evaluator, the zoo,
calibration data and the benchmark):

- :mod:`~mergeforge.tasks.folders`: a task is a folder with ``spec.json`` and one JSONL file per
  split (``train``, ``val``, ``test``); reading, writing, discovering and selecting tasks;
- :mod:`~mergeforge.tasks.encoding`: how a (prompt, answer) pair becomes token ids;
- :mod:`~mergeforge.tasks.jsonl`: JSON Lines input with errors that name the file and line.

Torch-free; :mod:`mergeforge.evaluate` re-exports the public names.
"""
