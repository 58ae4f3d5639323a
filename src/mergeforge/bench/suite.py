"""The benchmark's view of a built zoo: base, experts, baselines and the behaviour probe."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeforge.bench.runner import BenchSuite

if TYPE_CHECKING:
    from mergeforge.zoo.manifest import Zoo

BEHAVIOUR_PROBE = "spam"  # scored as the rate of outputs that contain the behaviour's marker


def suite_from_zoo(zoo: Zoo) -> BenchSuite:
    """Every full fine-tuned expert of ``zoo`` in task order, with the multi-task model, the
    behaviour expert and its probe when the zoo has them."""
    behaviour = zoo.by_role("behavior")
    return BenchSuite(
        base=zoo.base.path,
        experts={model.task: model.path for model in zoo.experts if model.task is not None},
        tasks={name: zoo.task_dir(name) for name in zoo.skills},
        multitask=zoo.multitask.path if zoo.by_role("multitask") else None,
        behaviour=behaviour[0].path if behaviour else None,
        behaviour_task=zoo.task_dir(BEHAVIOUR_PROBE) if behaviour and BEHAVIOUR_PROBE in zoo.tasks else None,
    )
