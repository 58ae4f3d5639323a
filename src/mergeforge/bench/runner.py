"""``run_bench``: every registered method over a set of experts, tuned on validation, scored on test.

The protocol follows the model-merging benchmarks (FusionBench, Tang et al. 2024, arXiv 2406.03280;
Ilharco et al. 2023, arXiv 2212.04089): experts fine-tuned from one base are merged into one
model, which is scored on every expert's task; a method's hyperparameters are picked on the
validation split from a small grid (``grids.py``) and only the chosen setting is scored on test.
Normalised accuracy is the merged model's accuracy on a task divided by that task's expert's.
Methods that cannot make one model from N experts run under another protocol (``grids.py``):
per-task models rebuilt from stored masks (EMR, TALL masks; the task id is known), or disjoint
pairs of experts (slerp, nearswap, ...), with a few multi-model methods on the same pairs.

Merges run in memory through the same planner and engine as ``mergeforge merge``
(:func:`mergeforge.merge_state_dicts`), so no checkpoint is written per grid point.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeforge.bench.grids import (
    MULTITASK,
    PAIRWISE,
    PAIRWISE_REFERENCE,
    PER_TASK,
    MethodPlan,
    describe,
    plan_method,
)
from mergeforge.methods.task_masks import task_state

Scores = dict[str, float]


@dataclass
class BenchSuite:
    """The models and tasks a benchmark runs on (``suite_from_zoo`` builds one from the zoo)."""

    base: Path
    experts: dict[str, Path]  # task name -> expert folder, in merge order
    tasks: dict[str, Path]  # task name -> task folder (evaluator format)
    multitask: Path | None = None
    behaviour: Path | None = None  # an expert with an unwanted behaviour, for task negation
    behaviour_task: Path | None = None  # scores the behaviour rate (exact match = behaviour shown)
    general_task: Path | None = None  # generic requests with the base's answers: general ability, by perplexity
    composition_task: Path | None = None  # a task that needs two experts' skills at once
    composition_experts: tuple[str, ...] = ()  # the task names of those two experts


@dataclass
class MethodResult:
    method: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    chosen: dict[str, Any] = field(default_factory=dict)
    validation: list[dict[str, Any]] = field(default_factory=list)  # one entry per grid point
    test: Scores = field(default_factory=dict)
    merge_seconds: float = 0.0
    protocol: str = MULTITASK  # see mergeforge.bench.grids


@dataclass
class BenchResult:
    tasks: list[str]
    baselines: dict[str, Scores]  # row name -> per-task test accuracy
    experts: Scores  # each task's own expert's test accuracy (the normaliser)
    methods: list[MethodResult]  # every method once, under its own protocol (see grids.plan_method)
    pairwise_reference: list[MethodResult]  # multi-model methods run two experts at a time too, for comparison
    negation: dict[str, Any] | None
    curve: dict[str, list[dict[str, Any]]]
    settings: dict[str, Any]
    composition: dict[str, Any] | None = None

    def normalised(self, scores: Scores) -> Scores:
        return {task: scores[task] / self.experts[task] if self.experts[task] > 0 else 0.0 for task in self.tasks}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class ModelPool:
    """Loads models once and scores state dicts by reusing one model skeleton (the bench's and
    the evolutionary search's)."""

    def __init__(self, suite: BenchSuite, max_examples: int | None, batch_size: int, device: str,
                 val_examples: int | None = None):
        from transformers import AutoTokenizer

        from mergeforge.tasks.folders import load_task

        self.device = device
        self.max_examples = max_examples
        self.val_examples = val_examples if val_examples is not None else max_examples
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(suite.base, local_files_only=True)
        self.tasks = {name: load_task(folder) for name, folder in suite.tasks.items()}
        self.skeleton = self.load(suite.base)
        self.states: dict[Path, dict[str, torch.Tensor]] = {}
        # Scored examples, those the teacher-forced pass could not settle (generated), and those
        # of them that generation found correct: how often forced scoring alone would be wrong.
        self.forced = [0, 0, 0]

    def load(self, folder: Path) -> Any:
        """A model folder as a float32 model on the device, in eval mode."""
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        return model.to(self.device).eval()

    def state(self, folder: Path) -> dict[str, torch.Tensor]:
        if folder not in self.states:
            self.states[folder] = {name: tensor.detach().clone() for name, tensor in self.load(folder).state_dict().items()}
        return self.states[folder]

    def model_with(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        self.skeleton.load_state_dict(state, strict=True)
        return self.skeleton

    def score(self, model: torch.nn.Module, split: str, tasks: Sequence[str] | None = None) -> Scores:
        from mergeforge.evaluate.api import evaluate_model

        chosen = [self.tasks[name] for name in (tasks or self.tasks)]
        with _threads_for(model):
            limit = self.val_examples if split == "val" else self.max_examples
            result = evaluate_model(model, chosen, split=split, batch_size=self.batch_size, max_examples=limit,
                                    tokenizer=self.tokenizer, with_loss=False, scoring="forced")
        for entry in result["tasks"].values():
            self.forced[0] += entry["n"]
            self.forced[1] += entry["generated"]
            self.forced[2] += entry["generated_correct"]
        return {name: entry["score"] for name, entry in result["tasks"].items()}

    def general(self, model: torch.nn.Module, task: Any) -> dict[str, float]:
        """General ability on the probe of generic requests: the perplexity of the base's own
        answers, and the share of them the model reproduces exactly."""
        from mergeforge.evaluate.api import evaluate_model

        with _threads_for(model):
            entry = evaluate_model(model, [task], split="test", batch_size=self.batch_size, tokenizer=self.tokenizer,
                                   scoring="forced")["tasks"][task.name]
        return {"perplexity": entry["perplexity"], "same_answer": entry["score"]}

    def score_state(self, state: dict[str, torch.Tensor], split: str, tasks: Sequence[str] | None = None) -> Scores:
        return self.score(self.model_with(state), split, tasks)


def _threads_for(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """One intra-op thread for small models (measured 5-8x slower with 2 threads on a busy 2-core
    machine): the evaluator's rule, at the benchmark's own size bound."""
    from mergeforge.evaluate.api import scoring_threads

    return scoring_threads(model, small_below=SMALL_MODEL_PARAMS)


SMALL_MODEL_PARAMS = 50_000_000


class ExpertMerger:
    """Merges chosen experts in memory with one method setting (data-aware methods calibrate on
    each expert's own training prompts, as Fisher merging and RegMean do)."""

    CALIBRATION_SAMPLES = 64

    def __init__(self, evaluator: ModelPool, suite: BenchSuite, base_state: dict[str, torch.Tensor],
                 expert_states: list[dict[str, torch.Tensor]], seed: int):
        self.evaluator, self.base_state, self.expert_states, self.seed = evaluator, base_state, expert_states, seed
        self.task_dirs = [str(suite.tasks[task]) for task in suite.experts]
        # The last calibration whose statistics serve every setting of its method (RegMean's α
        # grid calibrates once), keyed by method and experts; one is held at a time.
        self._calibration: tuple[tuple[str, tuple[int, ...]], dict[str, Any]] | None = None

    def __call__(self, plan: MethodPlan, params: dict[str, Any], experts: Sequence[int],
                 side_outputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        from mergeforge.engine.api import merge_state_dicts

        models = [self.expert_states[i] for i in experts]
        base = self.base_state if plan.uses_base else None
        if plan.first_as_base:
            base, models = models[0], models[1:]
        extra: dict[str, Any] = {}
        if plan.data_aware:
            extra = {"calibration": {"data": [self.task_dirs[i] for i in experts], "split": "train",
                                     "samples": self.CALIBRATION_SAMPLES},
                     "calibration_model": self.evaluator.skeleton, "tokenizer": self.evaluator.tokenizer}
            if plan.calibrates_once:
                key = (plan.method, tuple(experts))
                if self._calibration is None or self._calibration[0] != key:
                    self._calibration = None  # free the last one before calibrating again
                    self._calibration = (key, {})
                extra["calibration_cache"] = self._calibration[1]
        with _threads_for(self.evaluator.skeleton) if plan.data_aware else contextlib.nullcontext():
            return merge_state_dicts(
                plan.method, models, base, parameters=params, model_parameters=[dict(plan.model_fixed)] * len(models),
                seed=self.seed, threads=2, side_outputs=side_outputs, **extra,
            )


def _pairs(n_tasks: int) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
    """Disjoint expert pairs covering every task, each with the tasks it is scored on: (0, 1),
    (2, 3), ...; an odd last task is paired with the first and scored alone."""
    pairs: list[tuple[tuple[int, int], tuple[int, ...]]] = [((i, i + 1), (i, i + 1)) for i in range(0, n_tasks - 1, 2)]
    if n_tasks % 2:
        pairs.append(((n_tasks - 1, 0), (n_tasks - 1,)))
    return pairs


class SettingRun:
    """Merges one method setting and scores the result, under the plan's protocol."""

    def __init__(self, plan: MethodPlan, evaluator: ModelPool, merger: ExpertMerger, task_names: list[str]):
        self.plan, self.evaluator, self.merger, self.task_names = plan, evaluator, merger, task_names
        self._unit: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None  # the last merge at scale 1

    def merge(self, params: dict[str, Any]) -> tuple[Any, bool]:
        """The merged model(s) for ``params``, and whether a merge ran (else a stored merge was rescaled)."""
        everyone = range(len(self.task_names))
        scale = self.plan.rescaled
        if scale is not None and self.plan.protocol == MULTITASK:
            unit_params = {**params, scale: 1.0}
            ran = self._unit is None or self._unit[0] != unit_params
            if ran:
                self._unit = None  # free it before the next merge
                self._unit = (unit_params, self.merger(self.plan, unit_params, everyone))
            assert self._unit is not None
            factor, base = float(params[scale]), self.merger.base_state
            return {name: base[name] + factor * (tensor - base[name]) if tensor.is_floating_point() else tensor
                    for name, tensor in self._unit[1].items()}, ran
        return self._merge(params, everyone), True

    def _merge(self, params: dict[str, Any], everyone: range) -> Any:
        if self.plan.protocol == PAIRWISE:
            return [(scored, self.merger(self.plan, params, pair)) for pair, scored in _pairs(len(self.task_names))]
        if self.plan.protocol == PER_TASK:
            side: dict[str, torch.Tensor] = {}
            return self.merger(self.plan, params, everyone, side), side
        return self.merger(self.plan, params, everyone)

    def score(self, merged: Any, split: str) -> Scores:
        names = self.task_names
        if self.plan.protocol == PAIRWISE:
            scores: Scores = {}
            for scored, state in merged:
                scores.update(self.evaluator.score_state(state, split, [names[i] for i in scored]))
            return scores
        if self.plan.protocol == PER_TASK:
            state, side = merged
            scores = {}
            for i, task in enumerate(names):
                scores.update(self.evaluator.score_state(task_state(state, self.merger.base_state, side, i), split, [task]))
            return scores
        return self.evaluator.score_state(merged, split, names)


def _tune_and_test(plan: MethodPlan, evaluator: ModelPool, merger: ExpertMerger, task_names: list[str],
                   progress: Callable[[str], None]) -> MethodResult:
    from mergeforge.errors import MergeforgeError

    setting = SettingRun(plan, evaluator, merger, task_names)
    result = MethodResult(plan.method, "ok", protocol=plan.protocol)
    best: tuple[float, dict[str, Any], Any] | None = None
    started = time.perf_counter()
    merges = 0
    for params in plan.grid:
        try:
            merge_started = time.perf_counter()
            merged, ran = setting.merge(params)
            if ran:
                result.merge_seconds += time.perf_counter() - merge_started
                merges += 1
        except MergeforgeError as exc:
            result.validation.append({"params": params, "error": str(exc)})
            continue
        validation = setting.score(merged, "val")
        mean = _mean(list(validation.values()))
        result.validation.append({"params": params, "mean": mean, "scores": validation})
        if best is None or mean > best[0]:
            best = (mean, params, merged)
    if best is None:
        result.status, result.reason = "failed", "; ".join(v.get("error", "") for v in result.validation)
        return result
    result.chosen = best[1]
    result.test = setting.score(best[2], "test")
    result.merge_seconds /= max(1, merges)
    label = plan.method if plan.protocol == MULTITASK else f"{plan.method} ({plan.protocol})"
    progress(f"{label:<26} {describe(best[1]):<28} val {best[0]:.3f}  test {_mean(list(result.test.values())):.3f}"
             f"  ({time.perf_counter() - started:.0f} s)")
    return result


def _negation(suite: BenchSuite, evaluator: ModelPool, task_names: list[str], base_state: dict[str, torch.Tensor],
              expert_states: list[dict[str, torch.Tensor]], seed: int) -> dict[str, Any] | None:
    """Task negation (Ilharco et al. 2023, §3): subtract the behaviour vector and measure.

    A starting point is a model that has skills and shows the behaviour, as a merge that took in
    a contaminated fine-tune does: the whole behaviour vector plus the task vectors of the first
    k experts at a modest scale (``NEGATION_EXPERT_WEIGHT`` each), for each k of
    ``negation_expert_counts`` (a few experts, then all: the behaviour survives a few task vectors
    better than many). Subtracting λ·(behaviour − base) for a few λ gives the behaviour rate, the
    accuracy on those k experts' tasks, and the general-ability probe.
    """
    if suite.behaviour is None or suite.behaviour_task is None:
        return None
    from mergeforge.engine.api import merge_state_dicts
    from mergeforge.evaluate.api import evaluate_model
    from mergeforge.tasks.folders import load_task

    probe = load_task(suite.behaviour_task)
    general = load_task(suite.general_task) if suite.general_task is not None else None
    behaviour_state = evaluator.state(suite.behaviour)

    def measure(state: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, Any]:
        model = evaluator.model_with(state)
        with _threads_for(model):
            rate = evaluate_model(model, [probe], split="test", batch_size=evaluator.batch_size, max_examples=evaluator.max_examples,
                                  tokenizer=evaluator.tokenizer, with_loss=False, scoring="forced")["tasks"][probe.name]["score"]
        scores = evaluator.score(model, "test", tasks)
        row = {"behaviour_rate": rate, "tasks": scores, "mean_accuracy": _mean(list(scores.values()))}
        if general is not None:
            row["general"] = evaluator.general(model, general)
        return row

    rows = [{"model": "base", **measure(base_state, task_names)}, {"model": "behaviour expert", **measure(behaviour_state, task_names)}]
    starts = []
    for count in negation_expert_counts(len(expert_states)):
        label = f"base + {NEGATION_EXPERT_WEIGHT:g}·Σ {count} expert vectors + behaviour vector"
        tasks = task_names[:count]
        weights = [{"weight": NEGATION_EXPERT_WEIGHT}] * count + [{"weight": 1.0}]
        contaminated = merge_state_dicts("task_arithmetic", [*expert_states[:count], behaviour_state], base_state,
                                         model_parameters=weights)
        rows.append({"model": f"start: {label}", **measure(contaminated, tasks)})
        for scale in NEGATION_SCALES:
            # The starting model's own delta is kept whole (weight 1), the behaviour vector subtracted.
            negated = merge_state_dicts("task_arithmetic", [contaminated, behaviour_state], base_state,
                                        model_parameters=[{"weight": 1.0}, {"weight": -scale}], seed=seed)
            rows.append({"model": f"start ({count} experts) − {scale:g} × behaviour vector", **measure(negated, tasks)})
        starts.append(label)
    return {"starts": starts, "rows": rows}


def negation_expert_counts(experts: int) -> list[int]:
    """The numbers of task vectors in the negation experiment's starting points: 3, then all."""
    return sorted({min(3, experts), experts})


COMPOSITION_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")


def _composition(suite: BenchSuite, evaluator: ModelPool, merger: ExpertMerger, task_names: list[str],
                 progress: Callable[[str], None]) -> dict[str, Any] | None:
    """The composition case (Akiba et al., "Evolutionary Optimization of Model Merging Recipes",
    arXiv:2403.13187, in miniature): a task that needs two experts' skills at once. Scored: the
    base, each of the two experts, and merges of the two, each tuned on the task's validation split."""
    if suite.composition_task is None or not suite.composition_experts:
        return None
    from mergeforge.methods.registry import get_method
    from mergeforge.tasks.folders import load_task

    task = load_task(suite.composition_task)
    evaluator.tasks[task.name] = task
    pair = tuple(task_names.index(name) for name in suite.composition_experts)
    rows: list[dict[str, Any]] = [{"model": "base", "test": evaluator.score_state(merger.base_state, "test", [task.name])[task.name]}]
    for name, index in zip(suite.composition_experts, pair, strict=True):
        rows.append({"model": f"expert: {name}", "test": evaluator.score_state(merger.expert_states[index], "test", [task.name])[task.name]})
    for name in COMPOSITION_METHODS:
        plan = plan_method(get_method(name), len(pair))
        best: tuple[float, dict[str, Any], dict[str, torch.Tensor]] | None = None
        for params in plan.grid:
            state = merger(plan, params, pair)
            score = evaluator.score_state(state, "val", [task.name])[task.name]
            if best is None or score > best[0]:
                best = (score, params, state)  # only the best merge is kept: a grid of 135M-parameter states is gigabytes
        assert best is not None
        rows.append({"model": f"merge: {name}", "settings": describe(best[1]), "val": best[0],
                     "test": evaluator.score_state(best[2], "test", [task.name])[task.name]})
        progress(f"composition {name:<18} {describe(best[1]):<28} val {best[0]:.3f}  test {rows[-1]['test']:.3f}")
    return {"task": task.name, "experts": list(suite.composition_experts), "rows": rows}


def _curve(chosen: dict[str, MethodResult], evaluator: ModelPool, merger: ExpertMerger, task_names: list[str], experts: Scores,
           methods: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Normalised test accuracy on the first k tasks when merging the first k experts, k = 2..N,
    each method at the setting chosen for all N experts."""
    from mergeforge.methods.registry import get_method

    curve: dict[str, list[dict[str, Any]]] = {}
    for name in methods:
        if name not in chosen or chosen[name].status != "ok" or chosen[name].protocol != MULTITASK:
            continue
        method = get_method(name)
        points = []
        for k in range(2, len(task_names) + 1):
            plan = plan_method(method, k)
            if plan.skip_reason:
                continue
            state = merger(plan, chosen[name].chosen, range(k))
            scores = evaluator.score_state(state, "test", task_names[:k])
            normalised = [scores[t] / experts[t] if experts[t] > 0 else 0.0 for t in task_names[:k]]
            points.append({"experts": k, "mean_accuracy": _mean(list(scores.values())), "normalised": _mean(normalised)})
        curve[name] = points
    return curve


NEGATION_EXPERT_WEIGHT = 0.3
NEGATION_SCALES = (0.5, 1.0, 1.5)
DEFAULT_CURVE_METHODS = ("task_arithmetic", "ties", "dare_ties", "tsv", "iso_cts", "linear")


def run_bench(
    suite: BenchSuite,
    methods: Sequence[str] | None = None,
    *,
    max_examples: int | None = None,
    val_examples: int | None = None,
    expert_cross_scores: bool = True,
    ensemble: bool = True,
    batch_size: int = 128,
    device: str = "cpu",
    seed: int = 0,
    curve_methods: Sequence[str] = DEFAULT_CURVE_METHODS,
    negation: bool = True,
    progress: Callable[[str], None] = print,
) -> BenchResult:
    """Benchmark ``methods`` (default: every registered one) on ``suite``.

    Arguments:
        max_examples: score only the first N examples of each split (faster, noisier).
        val_examples: score only the first N validation examples in the grid searches (default:
            ``max_examples``): a validation subset for the grids, the whole test split for the results.
        expert_cross_scores: score every expert on every task (else on its own task only).
        ensemble: score the output ensemble of all experts (one forward pass per expert).
        curve_methods: methods whose accuracy is also measured against the number of experts.
        progress: called with one line per finished step.
    """
    from mergeforge.methods.registry import all_methods, get_method

    started = time.perf_counter()
    task_names = list(suite.experts)
    evaluator = ModelPool(suite, max_examples, batch_size, device, val_examples)
    base_state = evaluator.state(suite.base)
    expert_states = [evaluator.state(suite.experts[t]) for t in task_names]

    baselines: dict[str, Scores] = {"base": evaluator.score_state(base_state, "test", task_names)}
    experts: Scores = {}
    for task, state in zip(task_names, expert_states, strict=True):
        scores = evaluator.score_state(state, "test", task_names if expert_cross_scores else [task])
        if expert_cross_scores:
            baselines[f"expert: {task}"] = scores
        experts[task] = scores[task]
    baselines["individual experts"] = dict(experts)
    if suite.multitask is not None:
        baselines["multi-task model"] = evaluator.score_state(evaluator.state(suite.multitask), "test", task_names)
    if ensemble:
        from mergeforge.bench.ensemble import OutputEnsemble

        members = [evaluator.load(suite.experts[t]) for t in task_names]
        baselines["output ensemble"] = evaluator.score(OutputEnsemble(members).eval(), "test", task_names)
        del members
    progress(f"baselines done ({time.perf_counter() - started:.0f} s): individual experts mean {_mean(list(experts.values())):.3f}")

    merger = ExpertMerger(evaluator, suite, base_state, expert_states, seed)
    chosen_methods = [get_method(name) for name in methods] if methods else all_methods()
    results: list[MethodResult] = []
    for method in chosen_methods:
        plan = plan_method(method, len(task_names))
        if plan.skip_reason:
            results.append(MethodResult(method.name, "skipped", plan.skip_reason))
            progress(f"{method.name:<16} skipped: {plan.skip_reason}")
            continue
        results.append(_tune_and_test(plan, evaluator, merger, task_names, progress))
    pairwise_reference = []
    if any(r.protocol == PAIRWISE and r.status == "ok" for r in results):
        for name in PAIRWISE_REFERENCE:
            plan = plan_method(get_method(name), len(task_names), protocol=PAIRWISE)
            pairwise_reference.append(_tune_and_test(plan, evaluator, merger, task_names, progress))

    by_name = {r.method: r for r in results}
    negation_result = _negation(suite, evaluator, task_names, base_state, expert_states, seed) if negation else None
    curve = _curve(by_name, evaluator, merger, task_names, experts, curve_methods)
    composition = _composition(suite, evaluator, merger, task_names, progress)
    settings = {
        "max_examples": max_examples, "val_examples": evaluator.val_examples, "seed": seed, "device": device, "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {_cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "torch": torch.__version__, "python": platform.python_version(),
        "base": str(suite.base), "experts": {t: str(p) for t, p in suite.experts.items()},
        "forced_scoring": dict(zip(("examples", "generated", "generated_correct"), evaluator.forced, strict=True)),
    }
    return BenchResult(task_names, baselines, experts, results, pairwise_reference, negation_result, curve, settings,
                       composition)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
