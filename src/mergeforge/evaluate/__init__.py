"""The evaluator: exact-match accuracy by batched greedy generation, and answer loss/perplexity,
on tasks defined as plain JSONL splits plus a ``spec.json`` (see docs/evaluation.md).

Only the names below are public; they load lazily, so importing this package does not import
torch.

Example:
    >>> from mergeforge.evaluate import evaluate_model
    >>> evaluate_model("zoo/models/expert_reverse", ["zoo/tasks/reverse"])["tasks"]["reverse"]["score"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeforge._lazy import lazy_exports

__all__ = [
    "evaluate_model",
    "evaluate_with_harness",
    "export_lm_eval_task",
    "load_model_and_tokenizer",
    "format_table",
    "Example",
    "Task",
    "TaskError",
    "TaskSpec",
    "discover_tasks",
    "load_task",
    "resolve_tasks",
    "select_tasks",
    "write_task",
]

_LAZY = {
    "evaluate_model": "mergeforge.evaluate.api",
    "evaluate_with_harness": "mergeforge.evaluate.harness",
    "export_lm_eval_task": "mergeforge.evaluate.harness",
    "load_model_and_tokenizer": "mergeforge.evaluate.api",
    "format_table": "mergeforge.evaluate.report",
    "Example": "mergeforge.tasks.folders",
    "Task": "mergeforge.tasks.folders",
    "TaskError": "mergeforge.tasks.folders",
    "TaskSpec": "mergeforge.tasks.folders",
    "discover_tasks": "mergeforge.tasks.folders",
    "load_task": "mergeforge.tasks.folders",
    "resolve_tasks": "mergeforge.tasks.folders",
    "select_tasks": "mergeforge.tasks.folders",
    "write_task": "mergeforge.tasks.folders",
}

if TYPE_CHECKING:
    from mergeforge.evaluate.api import evaluate_model, load_model_and_tokenizer
    from mergeforge.evaluate.harness import evaluate_with_harness, export_lm_eval_task
    from mergeforge.evaluate.report import format_table
    from mergeforge.tasks.folders import (
        Example,
        Task,
        TaskError,
        TaskSpec,
        discover_tasks,
        load_task,
        resolve_tasks,
        select_tasks,
        write_task,
    )


__getattr__ = lazy_exports(globals(), _LAZY)
