"""The benchmark's view of a built zoo: base, experts, baselines and the behaviour probe."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeforge.bench.runner import BenchSuite

if TYPE_CHECKING:
    from mergeforge.zoo.manifest import Zoo

def suite_from_zoo(zoo: Zoo) -> BenchSuite:
    """Every full fine-tuned expert of ``zoo`` in task order, with the multi-task model, the
    behaviour expert and its probe (the task it was trained on, scored as the rate of outputs
    that contain its marker), the general-ability probe and the composition task when the zoo
    has them."""
    from mergeforge.zoo.chat_build import COMPOSITION_EXPERTS, COMPOSITION_TASK, GENERAL_TASK

    behaviour = zoo.by_role("behavior")
    probe = behaviour[0].task if behaviour else None
    experts = {model.task: model.path for model in zoo.experts if model.task is not None}
    composition = COMPOSITION_TASK in zoo.tasks and all(name in experts for name in COMPOSITION_EXPERTS)
    return BenchSuite(
        base=zoo.base.path,
        experts=experts,
        tasks={name: zoo.task_dir(name) for name in zoo.skills},
        multitask=zoo.multitask.path if zoo.by_role("multitask") else None,
        behaviour=behaviour[0].path if behaviour else None,
        behaviour_task=zoo.task_dir(probe) if probe is not None and probe in zoo.tasks else None,
        general_task=zoo.task_dir(GENERAL_TASK) if GENERAL_TASK in zoo.tasks else None,
        composition_task=zoo.task_dir(COMPOSITION_TASK) if composition else None,
        composition_experts=COMPOSITION_EXPERTS if composition else (),
    )
