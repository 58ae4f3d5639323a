"""Candidates merged and scored in memory: the hot path of a search.

The sources are loaded once (through the bench's model pool, :class:`mergeforge.bench.runner.ModelPool`),
one model skeleton stays resident, and a candidate's weights are copied into it in place. A
candidate is merged group by group (:mod:`mergeforge.evolve.space`) with the engine's own
:func:`~mergeforge.engine.api.merge_state_dicts`; a group whose genes equal those already in the
skeleton is neither merged nor copied, and the last few merges of each group are kept, so a
candidate that changes one group's genes recomputes one group. Scoring is the evaluator's
teacher-forced mode (``scoring="forced"``): one forward pass settles most examples.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeforge.evolve.config import SearchConfig, resolve_path
from mergeforge.evolve.space import SearchSpace, subset, tensors_by_group
from mergeforge.methods.registry import BaseUse, get_method

# Merges kept per group, the resident one included: enough to step back to the previous genes.
# With one group this is two copies of the model beside the sources, so no more.
CACHE_PER_GROUP = 2


@dataclass
class Scored:
    """One candidate's scores (``task: value`` of each fitness term's metric) and fitness."""

    scores: dict[str, float]
    fitness: float
    remerged_groups: int
    merge_seconds: float
    score_seconds: float


def fitness_of(config: SearchConfig, values: Mapping[str, float]) -> float:
    """Σ weight × metric over the fitness terms (higher is better; a negative weight turns a loss
    into something to maximise)."""
    return sum(term.weight * values[term.key] for term in config.fitness)


def score_model(config: SearchConfig, evaluator: Any, model: Any, split: str, generation: int | None = None
                ) -> dict[str, float]:
    """Each fitness term's metric for ``model`` on ``split`` (the search split's or the test
    split's number of examples), by the evaluator's forced scoring; lm-eval terms through
    lm-evaluation-harness on the same model. With ``generation`` and a ``splits.minibatch``: on
    that generation's minibatch of the search split."""
    from mergeforge.evaluate.api import evaluate_model

    limit = config.splits.search_examples if split == config.splits.search else config.splits.test_examples
    local = [t for t in config.fitness if t.task is not None]
    values: dict[str, float] = {}
    if local:
        tasks = [evaluator.tasks[name] for name in dict.fromkeys(t.folder_name for t in local)]
        if generation is not None and config.splits.minibatch is not None and split == config.splits.search:
            from mergeforge.evolve.fitness import minibatch_tasks

            tasks = minibatch_tasks(config, tasks, generation)
        with_loss = any(term.metric != "score" for term in local)
        result = evaluate_model(model, tasks, split=split, batch_size=config.batch_size, max_examples=limit,
                                tokenizer=evaluator.tokenizer, with_loss=with_loss, scoring="forced")
        for term in local:
            values[term.key] = float(result["tasks"][evaluator.tasks[term.folder_name].name][term.metric])
    harnessed = [t for t in config.fitness if t.lm_eval is not None]
    if harnessed:
        names = list(dict.fromkeys(t.lm_eval for t in harnessed))
        scores = lm_eval_harness(config).score(model, evaluator.tokenizer, names, split, limit, config.batch_size)
        for term in harnessed:
            values[term.key] = scores[term.lm_eval][term.metric]  # the metric was checked before the search
    return values


def task_folders(config: SearchConfig, folder: Path) -> dict[str, Path]:
    """The task folders of the fitness terms (lm-eval terms have none), by folder name."""
    return {t.folder_name: resolve_path(t.task, folder) for t in config.fitness if t.task is not None}


def check_lm_eval_terms(config: SearchConfig) -> None:
    """Before any model is read: lm-eval is installed, and each lm-eval term's task exists under its
    include path, has the search and the test split, and reports the term's metric."""
    from mergeforge.evaluate.harness import HarnessError

    harness = lm_eval_harness(config)
    for term in config.fitness:
        if term.lm_eval is None:
            continue
        for split in (config.splits.search, config.splits.test):
            metrics = harness.metrics(term.lm_eval, split)
            if term.metric != "score" and term.metric not in metrics:
                raise HarnessError(f"fitness term '{term.key}': lm-eval task '{term.lm_eval}' reports no metric "
                                   f"'{term.metric}' (its metrics: {', '.join(metrics) or 'none'})")


_HARNESSES: dict[tuple[str, ...], Any] = {}


def lm_eval_harness(config: SearchConfig) -> Any:
    """The search's :class:`~mergeforge.evaluate.harness.InMemoryHarness` over the include paths
    of its lm-eval terms (absolute by now: :func:`~mergeforge.evolve.api.absolute_paths`), made once
    per process, so each task is indexed and loaded once."""
    paths = tuple(dict.fromkeys(str(t.include_path) for t in config.fitness if t.include_path is not None))
    if paths not in _HARNESSES:
        from mergeforge.evaluate.harness import InMemoryHarness

        _HARNESSES[paths] = InMemoryHarness(paths)
    return _HARNESSES[paths]


class CandidatePool:
    """The resident model, the sources, and the per-group merge cache of one search."""

    def __init__(self, config: SearchConfig, folder: Path):
        from mergeforge.bench.runner import BenchSuite, ModelPool

        assert config.merge_method is not None and config.models is not None and config.base_model is not None
        self.config = config
        self.method = get_method(config.merge_method)
        self.task_dirs = task_folders(config, folder)
        self.base_dir = resolve_path(config.base_model, folder)
        self.model_dirs = [resolve_path(m.model, folder) for m in config.models]
        suite = BenchSuite(base=self.base_dir, experts={}, tasks=self.task_dirs)
        self.pool = ModelPool(suite, config.splits.test_examples, config.batch_size, config.device,
                               config.splits.search_examples)
        self.base_state = self.pool.state(self.base_dir)
        self.model_states = [self.pool.state(path) for path in self.model_dirs]
        self.target = self.pool.skeleton.state_dict()  # shares storage with the skeleton: copies land in the model
        self.names = list(self.target)
        self.space = SearchSpace(config, self.method, self.names)
        self.group_names = tensors_by_group(self.space, self.names)
        self.resident: list[tuple[float, ...] | None] = [None] * len(self.group_names)
        self.cache: list[OrderedDict[tuple[float, ...], dict[str, torch.Tensor]]] = [OrderedDict() for _ in self.group_names]
        # The searched λ that only scales the merged task vector (see merge_group), if any, and
        # per group its merge at λ = 1 keyed by the group's other genes.
        self.rescaled = next((p.name for p in self.method.params if p.scales_result and not p.per_model
                              and p.name in (config.search or {})), None)
        self.units: list[tuple[tuple[float, ...], dict[str, torch.Tensor]] | None] = [None] * len(self.group_names)
        self.base32 = {name: t.float() for name, t in self.base_state.items()} if self.rescaled else {}

    # -- merging ------------------------------------------------------------------------------

    def merge_group(self, values: Sequence[float], group: int) -> dict[str, torch.Tensor]:
        """One group's tensors merged by the engine with that group's parameters. When the searched
        scale only multiplies the merged task vector (``Param.scales_result``: λ of task
        arithmetic, TIES, TSV-M, Iso-C/CTS, ...), the group is merged once at λ = 1 (in float32)
        for its other genes, and each λ is ``base + λ·(unit − base)``: an SVD method's merge is not
        run again for every candidate."""
        params = self.space.group_parameters(values, group)
        if self.rescaled is None:
            return self._merge(group, params.top, params.per_model)
        others = tuple(v for v, gene in zip(values, self.space.genes, strict=True)
                       if gene.group == group and gene.param != self.rescaled)
        stored = self.units[group]
        if stored is None or stored[0] != others:
            self.units[group] = stored = None  # free the old one before the next merge
            stored = self.units[group] = (others, self._merge(group, {**params.top, self.rescaled: 1.0}, params.per_model,
                                                              out_dtype="float32"))
        unit = stored[1]
        scale = float(params.top[self.rescaled])
        with torch.no_grad():
            return {name: (self.base32[name] + scale * (tensor - self.base32[name])).to(self.base_state[name].dtype)
                    if tensor.is_floating_point() else tensor for name, tensor in unit.items()}

    def _merge(self, group: int, top: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]],
               out_dtype: str | None = None) -> dict[str, torch.Tensor]:
        from mergeforge.engine.api import merge_state_dicts

        names = self.group_names[group]
        base = subset(self.base_state, names) if self.method.base != BaseUse.NONE else None
        return merge_state_dicts(self.method.name, [subset(state, names) for state in self.model_states], base,
                                 parameters=top, model_parameters=per_model, seed=self.config.seed,
                                 device=self.config.device, threads=2, out_dtype=out_dtype)

    def load(self, values: Sequence[float]) -> int:
        """Put the candidate's weights into the resident model; returns how many groups were merged."""
        merged = 0
        for group in range(len(self.group_names)):
            key = self.space.group_genes(values, group)
            if self.resident[group] == key:
                continue
            self.resident[group] = None  # the skeleton's group is in doubt until its copy ends
            cache = self.cache[group]
            if key in cache:
                cache.move_to_end(key)
            else:
                cache[key] = self.merge_group(values, group)
                merged += 1
                while len(cache) > CACHE_PER_GROUP:
                    cache.popitem(last=False)
            self._copy_in(cache[key])
            self.resident[group] = key
        return merged

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """A whole state dict (a baseline, a re-merged winner) into the resident model."""
        self.resident = [None] * len(self.group_names)
        self._copy_in(state)

    def load_source(self, index: int) -> None:
        """Source ``index`` into the resident model (for the test table)."""
        self.load_state(self.model_states[index])

    def load_folder(self, folder: Path) -> None:
        """A merged model folder (the re-merged winner) into the resident model."""
        self.load_state(self.pool.state(folder))

    def winner_recipe(self, values: Sequence[float]) -> dict[str, Any]:
        return self.space.recipe(values, [str(path) for path in self.model_dirs], str(self.base_dir))

    def forget(self) -> None:
        """After a failure the resident weights are unknown: every group is copied again next time."""
        self.resident = [None] * len(self.group_names)

    def _copy_in(self, tensors: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.target[name].copy_(tensor)

    # -- scoring ------------------------------------------------------------------------------

    def score(self, split: str, generation: int | None = None) -> dict[str, float]:
        """Each fitness term's metric for the resident model on ``split`` (generation
        ``generation``'s minibatch of it if the search has one)."""
        return score_model(self.config, self.pool, self.pool.skeleton, split, generation)

    def evaluate(self, values: Sequence[float], generation: int | None = None) -> Scored:
        """Merge (partially) and score one candidate on the search split (generation
        ``generation``'s minibatch of it if the search has one; the whole split when None)."""
        started = time.perf_counter()
        remerged = self.load(values)
        merged_at = time.perf_counter()
        scores = self.score(self.config.splits.search, generation)
        return Scored(scores, fitness_of(self.config, scores), remerged, merged_at - started, time.perf_counter() - merged_at)

    def full_merge(self, method: str, parameters: Mapping[str, Any], model_parameters: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A whole-model merge of the sources (baselines), by the same engine call."""
        from mergeforge.engine.api import merge_state_dicts

        base = self.base_state if get_method(method).base != BaseUse.NONE else None
        return merge_state_dicts(method, self.model_states, base, parameters=parameters, model_parameters=model_parameters,
                                 seed=self.config.seed, device=self.config.device, threads=2)
