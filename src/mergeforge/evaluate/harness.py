"""Bridge to lm-evaluation-harness (``lm_eval``), offline, with local YAML tasks.

lm-evaluation-harness is EleutherAI's evaluation framework (Gao et al., "A framework for few-shot
language model evaluation", doi:10.5281/zenodo.10256836; Biderman et al., "Lessons from the
Trenches on Reproducible Evaluation of Language Models", arXiv:2405.14782). This module

- exports a mergeforge task folder (``spec.json`` + JSONL splits) as an lm-eval task YAML that
  reads the local JSONL through the ``datasets`` packaged ``json`` builder, so it runs offline
  (:func:`export_lm_eval_task`), and
- runs lm-eval's ``simple_evaluate`` with its Hugging Face model (``HFLM``) on a local model
  folder, on exported mergeforge tasks and on the user's own YAML tasks found under
  ``include_path`` (:func:`evaluate_with_harness`).

The export is built to score exactly what :func:`mergeforge.evaluate.evaluate_model` scores:
``generate_until`` with greedy decoding, the prompt encoded with the tokenizer's special tokens
(lm-eval's default, as ours), generation ending at the end-of-sequence token, the spec's stop
strings or ``max_new_tokens``, and both sides stripped before comparison (``exact_match`` with
``regexes_to_ignore`` for leading/trailing whitespace). lm-eval has no "contains" metric, so a
task with ``metric: contains`` gets a three-line ``process_results`` module written beside its
YAML. The tests check that both evaluators give the same output on every example.

``lm_eval`` is optional (``pip install 'mergeforge[lmeval]'``) and imported only inside the
functions that run it; exporting needs only PyYAML.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mergeforge.errors import CheckpointError, MergeforgeError
from mergeforge.tasks.folders import (
    SPLITS,
    Task,
    TaskError,
    discover_tasks,
    load_task,
    resolve_tasks,
)

INSTALL_HINT = "pip install 'mergeforge[lmeval]'"
# The oldest lm_eval the tests pass with under transformers 5 (0.4.9.2 fails to import HFLM).
MIN_LM_EVAL = "0.4.10"
# Leading and trailing whitespace, removed from generation and reference alike: the same as
# mergeforge's ``normalise`` (str.strip) followed by ``answer.strip()``.
STRIP_REGEXES = [r"^\s+", r"\s+$"]
# Keys of an lm-eval result entry that are not metric values.
_RESULT_INFO_KEYS = {"alias", "name", "sample_len", "sample_count", " "}


class HarnessError(MergeforgeError):
    """lm-evaluation-harness is missing, or a harness task or include path is unusable."""


def require_lm_eval() -> Any:
    """Import ``lm_eval`` (after switching the Hugging Face libraries to offline mode, unless the
    user set their variables), or raise :class:`HarnessError` saying how to install it."""
    # huggingface_hub and datasets read these once, when first imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
    except ImportError:
        raise HarnessError(f"lm-evaluation-harness (lm_eval) is not installed; {INSTALL_HINT}") from None
    return lm_eval


def lm_eval_task_name(task: Task) -> str:
    """The lm-eval task name of an exported mergeforge task: its spec name."""
    return task.name


def _module_stem(name: str) -> str:
    # lm-eval's `!function a.b` loads `a.py` beside the YAML, so the stem must hold no dot.
    return "mergeforge_contains_" + re.sub(r"\W", "_", name)


def harness_task_config(task: Task, split: str = "test") -> dict[str, Any]:
    """The lm-eval task configuration (as a dict, YAML-ready) that scores ``task`` on ``split``.

    The dataset is every existing JSONL split of the task folder, by absolute path, loaded by
    the ``datasets`` ``json`` builder (no network). The ``contains`` metric's
    ``process_results`` is not in the dict: it is a ``!function`` tag, written by
    :func:`export_lm_eval_task`.
    """
    spec = task.spec
    split_file = task.split_path(split)
    if not split_file.is_file():
        task.examples(split, 1)  # raises TaskError naming the splits the task has
    data_files = {name: str(task.split_path(name).resolve()) for name in SPLITS if task.split_path(name).is_file()}
    config: dict[str, Any] = {
        "task": lm_eval_task_name(task),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": split,
        "output_type": "generate_until",
        "doc_to_text": spec.prompt_key,
        "doc_to_target": spec.answer_key,
        "generation_kwargs": {
            # An explicit list, so lm-eval does not add its default "\n\n"; HFLM adds the
            # tokenizer's end-of-sequence string itself. An empty stop string would end every
            # generation at once, and mergeforge ignores it, so it is dropped.
            "until": [stop for stop in spec.stop if stop],
            "max_gen_toks": spec.max_new_tokens,
            "do_sample": False,
        },
    }
    if "train" in data_files and split != "train":
        config["training_split"] = "train"
    if "val" in data_files and split != "val":
        config["validation_split"] = "val"
    if spec.metric == "exact_match":
        config["metric_list"] = [{
            "metric": "exact_match",
            "aggregation": "mean",
            "higher_is_better": True,
            "regexes_to_ignore": list(STRIP_REGEXES),
        }]
    else:
        config["metric_list"] = [{"metric": "contains", "aggregation": "mean", "higher_is_better": True}]
    config["metadata"] = {
        "version": 1.0,
        "mergeforge_task": str(task.folder.resolve()),
        "description": spec.description,
    }
    return config


def _contains_module(task: Task) -> str:
    return (
        f'"""Written by mergeforge: the \'contains\' metric of task {task.name!r} (1 when the\n'
        'stripped reference occurs in the generation, as mergeforge\'s evaluator scores it)."""\n'
        "\n"
        f"ANSWER_KEY = {task.spec.answer_key!r}\n"
        "\n"
        "\n"
        "def process_results(doc, results):\n"
        '    return {"contains": float(doc[ANSWER_KEY].strip() in results[0].strip())}\n'
    )


def export_lm_eval_task(task_folder: str | Path | Task, out_dir: str | Path, split: str = "test") -> Path:
    """Write ``task_folder`` as an lm-eval task YAML into ``out_dir``; returns the YAML's path.

    The YAML is ``<task name>.yaml``; a ``contains`` task also gets
    ``mergeforge_contains_<name>.py`` beside it. Run it with
    ``lm_eval --model hf --model_args pretrained=MODEL_DIR --include_path OUT_DIR --tasks NAME``
    or :func:`evaluate_with_harness`. The JSONL files are referenced by absolute path, so the
    task folder must stay where it is.

    Example:
        >>> export_lm_eval_task("zoo/tasks/reverse", "lm_eval_tasks/")
        PosixPath('lm_eval_tasks/reverse.yaml')
    """
    import yaml

    task = task_folder if isinstance(task_folder, Task) else load_task(task_folder)
    config = harness_task_config(task, split)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HarnessError(f"{out}: exists and is not a folder; pass a folder for the exported YAML")
    out.mkdir(parents=True, exist_ok=True)
    text = f"# Exported by mergeforge from {task.folder.resolve()} (split {split}).\n"
    text += yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)
    if task.spec.metric == "contains":
        stem = _module_stem(task.name)
        (out / f"{stem}.py").write_text(_contains_module(task), encoding="utf-8")
        text += f"process_results: !function {stem}.process_results\n"
    path = out / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task.name)}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _check_include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if include_path is None:
        return []
    paths = [Path(include_path)] if isinstance(include_path, (str, Path)) else [Path(p) for p in include_path]
    for path in paths:
        if not path.is_dir():
            raise HarnessError(f"{path}: include path not found; pass a folder holding lm-eval task YAML files")
    return [path.resolve() for path in paths]


def _yaml_task_names(include_paths: list[Path]) -> set[str]:
    if not include_paths:
        return set()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
    return set(manager.all_tasks)


def _split_names(tasks: str | Path | Task | Sequence[str | Path | Task]) -> list[str | Path | Task]:
    if isinstance(tasks, str):
        return [name.strip() for name in tasks.split(",") if name.strip()]
    if isinstance(tasks, (Path, Task)):
        return [tasks]
    return list(tasks)


def _resolve_harness_tasks(
    tasks: str | Path | Task | Sequence[str | Path | Task],
    yaml_names: set[str],
    task_root: str | Path | None,
    model_dir: Path,
) -> tuple[list[Task], list[str], list[str]]:
    """Split the requested tasks into mergeforge tasks (to export) and lm-eval YAML task names;
    also returns every lm-eval task name in the order asked for."""
    items = _split_names(tasks)
    if not items:
        raise HarnessError("no harness task given; pass task folders, zoo task names or lm-eval task names")
    mergeforge_tasks: list[Task] = []
    yaml_tasks: list[str] = []
    order: list[str] = []
    for item in items:
        if isinstance(item, Task):
            found = [item]
        elif isinstance(item, str) and item in yaml_names:
            if item not in yaml_tasks:
                yaml_tasks.append(item)
                order.append(item)
            continue
        elif Path(item).is_dir():
            found = discover_tasks(item)
        else:
            try:
                found = resolve_tasks([str(item)], task_root, model_dir)
            except TaskError as exc:
                yaml_known = ", ".join(sorted(yaml_names)) or "none"
                raise HarnessError(f"{exc}; lm-eval tasks under --include-path: {yaml_known} "
                                   "(lm-eval's built-in tasks are not offered: they download their data)") from None
        for task in found:
            if task not in mergeforge_tasks:
                mergeforge_tasks.append(task)
                order.append(lm_eval_task_name(task))
    names = [lm_eval_task_name(task) for task in mergeforge_tasks]
    clashes = sorted({name for name in names if names.count(name) > 1} | (set(names) & set(yaml_tasks)))
    if clashes:
        raise HarnessError(f"two harness tasks are named {', '.join(repr(n) for n in clashes)}; lm-eval needs unique names")
    return mergeforge_tasks, yaml_tasks, order


def _check_model_folder(model_dir: Path) -> bool:
    """Validate the model folder before lm-eval loads it; True when it is a PEFT adapter."""
    from mergeforge.checkpoint.peft import is_adapter_folder

    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model folder not found")
    if is_adapter_folder(model_dir):
        return True
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json (nor adapter_config.json); pass a Hugging Face model folder")
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise CheckpointError(f"{model_dir}: no tokenizer saved beside the model; lm-eval needs one (tokenizer.save_pretrained)")
    return False


def _jsonable(value: Any) -> Any:
    """lm-eval's results with numpy scalars, tuples, dtypes and callables made JSON-safe."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)


def _primary_metric(entry: dict[str, Any], config: dict[str, Any] | None) -> tuple[str, str] | None:
    """(``metric``, ``metric,filter`` key) of the task's first configured metric, else the first
    metric in its result entry."""
    keys = [key for key in entry if key not in _RESULT_INFO_KEYS and "_stderr," not in key and "," in key]
    if config:
        wanted = [item.get("metric") for item in config.get("metric_list") or [] if isinstance(item, dict)]
        for metric in wanted:
            for key in keys:
                if key.split(",", 1)[0] == metric:
                    return metric, key
    for key in keys:
        if isinstance(entry[key], (int, float)) and not isinstance(entry[key], bool):
            return key.split(",", 1)[0], key
    return None


def _summarise(raw: dict[str, Any], exported: dict[str, Task], order: list[str],
               return_predictions: bool) -> dict[str, Any]:
    """Per task (in the order asked for; then any group or subtask lm-eval added): the primary
    metric, its score, the count of correct documents when the metric is 0/1 per document."""
    summary: dict[str, Any] = {}
    configs = raw.get("configs", {})
    n_samples = raw.get("n-samples", {})
    samples = raw.get("samples", {})
    results = raw.get("results", {})
    # lm-eval's own order of results changed between releases (0.4.10 sorts by name).
    names = [name for name in order if name in results] + [name for name in results if name not in order]
    for name in names:
        entry = results[name]
        chosen = _primary_metric(entry, configs.get(name))
        if chosen is None:
            continue
        metric, key = chosen
        score = float(entry[key])
        task_samples = sorted(samples.get(name, []), key=lambda sample: sample.get("doc_id", 0))
        values = [float(sample[metric]) for sample in task_samples if metric in sample]
        n = n_samples.get(name, {}).get("effective", len(values) or None)
        correct = int(sum(values)) if values and all(v in (0.0, 1.0) for v in values) else None
        item: dict[str, Any] = {
            "metric": metric,
            "score": score,
            "correct": correct,
            "n": n,
            "source": f"mergeforge task {exported[name].folder}" if name in exported else "lm-eval YAML",
        }
        if return_predictions:
            filter_name = key.split(",", 1)[1]
            item["predictions"] = [
                {
                    "prompt": sample["arguments"][0][0],
                    "answer": sample.get("target"),
                    "output": sample["filtered_resps"][0] if sample.get("filtered_resps") else None,
                    "correct": float(sample[metric]) if metric in sample else None,
                }
                for sample in task_samples
                if sample.get("filter", filter_name) == filter_name
            ]
        summary[name] = item
    return summary


def evaluate_with_harness(
    model_dir: str | Path,
    tasks: str | Path | Task | Sequence[str | Path | Task],
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    split: str = "test",
    task_root: str | Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Run lm-evaluation-harness on a local model folder, offline.

    Arguments:
        model_dir: a Hugging Face model folder with its tokenizer (loaded by lm-eval's ``HFLM``
            from the path), or a PEFT LoRA adapter folder (merged into its base by mergeforge,
            then handed to ``HFLM`` as a model object).
        tasks: comma-separated string or list of: lm-eval task names defined by YAML files under
            ``include_path``; mergeforge task folders (or folders of them); task names of
            ``task_root`` (default: the zoo that holds ``model_dir``). mergeforge tasks are
            exported to YAML in a temporary folder first.
        include_path: folder(s) of the user's own lm-eval task YAML files.
        limit: score only the first N documents of each task (lm-eval's ``limit``).
        batch_size: prompts per generation batch.
        split: the split that exported mergeforge tasks score (YAML tasks use their own).
        device: ``cpu`` or ``cuda[:N]``.
        threads: torch threads; default 1 for models under 100M parameters (as evaluate_model).
        return_predictions: include every prompt, reference, output and verdict per task.

    Returns:
        ``{"model", "split", "tasks": {name: {"metric", "score", "correct", "n", "source"}},
        "mean_score", "seconds", "lm_eval_version", "lm_eval": {"results", "configs",
        "versions", "n-samples", "higher_is_better"}}``; ``correct`` is None when the metric is
        not 0/1 per document.

    Example:
        >>> evaluate_with_harness("zoo/models/expert_reverse", "reverse", limit=50)["tasks"]["reverse"]["score"]
    """
    started = time.perf_counter()
    lm_eval_module = require_lm_eval()
    model_path = Path(model_dir)
    include_paths = _check_include_paths(include_path)
    if limit is not None and limit < 1:
        raise HarnessError(f"limit must be at least 1, got {limit}")
    yaml_names = _yaml_task_names(include_paths)
    mergeforge_tasks, yaml_tasks, order = _resolve_harness_tasks(tasks, yaml_names, task_root, model_path)
    for task in mergeforge_tasks:
        task.examples(split, 1)  # a missing split fails now, not inside lm-eval
    adapter = _check_model_folder(model_path)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CheckpointError(f"--device {device}: CUDA is not available on this machine; use --device cpu")

    # Chat tasks (chat: true) run with lm-eval's own chat-template rendering, which applies to
    # every task of the run: one run holds chat tasks with one system message, or none.
    chat_modes = {(task.spec.chat, task.spec.system if task.spec.chat else None) for task in mergeforge_tasks}
    if len(chat_modes) > 1:
        raise HarnessError("--harness: these tasks mix chat and plain prompts (or two system messages); lm-eval "
                           "applies a chat template to a whole run, so score them in separate runs")
    chat, system = next(iter(chat_modes)) if chat_modes else (False, None)
    with tempfile.TemporaryDirectory(prefix="mergeforge-lm-eval-") as export_dir:
        exported = {}
        for task in mergeforge_tasks:
            export_lm_eval_task(task, export_dir, split)
            exported[lm_eval_task_name(task)] = task
        raw = _run_simple_evaluate(model_path, adapter, [*exported, *yaml_tasks],
                                   [Path(export_dir), *include_paths], limit, batch_size, device, threads, chat, system)
    summary = _summarise(raw, exported, order, return_predictions)
    scores = [entry["score"] for entry in summary.values()]
    return {
        "model": str(model_dir),
        "split": split,
        "tasks": summary,
        "mean_score": sum(scores) / len(scores) if scores else float("nan"),
        "seconds": time.perf_counter() - started,
        "lm_eval_version": getattr(lm_eval_module, "__version__", "unknown"),
        "lm_eval": _jsonable({key: raw.get(key) for key in ("results", "groups", "configs", "versions",
                                                            "n-samples", "higher_is_better") if key in raw}),
    }


def _run_simple_evaluate(model_path: Path, adapter: bool, task_names: list[str], include_paths: list[Path],
                         limit: int | None, batch_size: int, device: str, threads: int | None, chat: bool = False,
                         system: str | None = None) -> dict[str, Any]:
    import transformers

    from mergeforge.evaluate.api import scoring_threads

    try:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except (ImportError, AttributeError) as exc:
        # e.g. lm_eval <= 0.4.9 with transformers 5 (AutoModelForVision2Seq is gone).
        import lm_eval

        version = getattr(lm_eval, "__version__", "?")
        raise HarnessError(f"lm_eval {version} does not load with transformers {transformers.__version__} ({exc}); "
                           f"pip install -U 'lm_eval>={MIN_LM_EVAL}'") from None

    dtype = "float32" if device == "cpu" else "auto"
    try:
        if adapter:
            from mergeforge.evaluate.api import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(model_path, device=device)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        else:
            lm = HFLM(pretrained=str(model_path.resolve()), device=device, dtype=dtype, batch_size=batch_size,
                      trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{model_path}: lm-eval cannot load the model ({exc})") from None
    with scoring_threads(lm.model, threads):
        manager = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
        raw = simple_evaluate(model=lm, tasks=task_names, task_manager=manager, limit=limit, log_samples=True,
                              apply_chat_template=chat, system_instruction=system)
    if raw is None:  # simple_evaluate returns None on non-zero ranks only
        raise HarnessError("lm-eval returned no result")
    return raw


def format_harness_result(result: dict[str, Any]) -> str:
    """One line per task, in the look of the native evaluator's output."""
    version = result.get("lm_eval_version")
    lines = [f"{result['model']} with lm-evaluation-harness{' ' + version if version else ''}:"]
    width = max((len(name) for name in result["tasks"]), default=0)
    for name, entry in result["tasks"].items():
        text = f"  {name.ljust(width)}  {entry['metric']} {100 * entry['score']:5.1f}%"
        if entry["correct"] is not None:
            text += f"  ({entry['correct']}/{entry['n']})"
        elif entry["n"] is not None:
            text += f"  (n={entry['n']})"
        lines.append(text)
    lines.append(f"  mean score {100 * result['mean_score']:.1f}%  ({result['seconds']:.1f} s)")
    return "\n".join(lines)


# -- in-memory models (the fitness of `mergeforge evolve`) -------------------------------------

# mergeforge's split names and the lm-eval task attribute that names each one's data.
SPLIT_FIELDS = {"train": "training_split", "val": "validation_split", "test": "test_split"}


class InMemoryHarness:
    """lm-eval YAML tasks scored on models held in memory (``HFLM(pretrained=model)``), each on
    mergeforge's split names: ``val`` is the task's ``validation_split``, ``test`` its
    ``test_split``, ``train`` its ``training_split``. lm-eval scores a task's test split, so a
    task is built once per split with its ``test_split`` pointed at that split's data; the built
    tasks are kept, so a search of many candidates indexes and loads each one once."""

    def __init__(self, include_paths: Sequence[str | Path]):
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        self.include_paths = _check_include_paths(list(include_paths))
        self.manager = TaskManager(include_path=[str(p) for p in self.include_paths], include_defaults=False)
        self.built: dict[tuple[str, str], Any] = {}
        self.lm: Any = None  # HFLM over the last model scored

    def metrics(self, name: str, split: str) -> list[str]:
        """The metrics task ``name`` reports (its ``metric_list``); fails in one line if it is not a
        task under the include paths or lacks ``split``."""
        config = self._task(name, split).config
        return [item["metric"] for item in config.metric_list or [] if isinstance(item, dict) and "metric" in item]

    def _task(self, name: str, split: str) -> Any:
        if (name, split) in self.built:
            return self.built[(name, split)]
        if name not in set(self.manager.all_tasks):
            where = ", ".join(str(p) for p in self.include_paths)
            known = ", ".join(sorted(self.manager.all_tasks)) or "none"
            raise HarnessError(f"lm-eval task '{name}' is not defined under {where} (tasks there: {known})")
        if split not in SPLIT_FIELDS:
            raise HarnessError(f"lm-eval task '{name}': split '{split}' has no lm-eval counterpart "
                               f"(use {', '.join(SPLIT_FIELDS)})")
        plain = self.manager.load_task_or_group([name])[name]
        data = getattr(plain.config, SPLIT_FIELDS[split], None)
        if not data:
            raise HarnessError(f"lm-eval task '{name}' has no {SPLIT_FIELDS[split]}, which the split '{split}' needs")
        if data == plain.config.test_split:
            task = plain
        else:
            from lm_eval.api.task import ConfigurableTask

            task = ConfigurableTask(config={**plain.config.to_dict(keep_callable=True), "test_split": data})
        self.built[(name, split)] = task
        return task

    def score(self, model: Any, tokenizer: Any, names: Sequence[str], split: str, limit: int | None,
              batch_size: int) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` for ``model`` on ``split`` (the first ``limit`` documents),
        each task's primary metric also under ``"score"``."""
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        tasks = [self._task(name, split) for name in names]
        if self.lm is None or self.lm.model is not model:  # a search scores one resident model again and again
            device = str(next(model.parameters()).device)
            with _quiet("lm_eval.models.huggingface"):  # its warnings about a model object, once per model
                self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        lm = self.lm
        # Quiet: lm-eval's progress bars (stderr) would bury the search's own; its errors still raise.
        with _quiet("lm_eval"), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            raw = simple_evaluate(model=lm, tasks=tasks, task_manager=self.manager, limit=limit, log_samples=False,
                                  verbosity="ERROR")  # its own manager would index every built-in task (seconds)
        if raw is None:
            raise HarnessError("lm-eval returned no result")
        scores: dict[str, dict[str, float]] = {}
        for name in names:
            entry = raw["results"][name]
            values = {key.split(",", 1)[0]: float(value) for key, value in entry.items()
                      if key not in _RESULT_INFO_KEYS and "_stderr," not in key and "," in key
                      and isinstance(value, (int, float)) and not isinstance(value, bool)}
            primary = _primary_metric(entry, raw.get("configs", {}).get(name))
            if primary is not None:
                values["score"] = float(entry[primary[1]])
            scores[name] = values
        return scores


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """``logger`` at ERROR level for the block (lm-eval logs at INFO/WARNING per call)."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)

