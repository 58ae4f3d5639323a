"""``build_zoo``: generate the data, pretrain the base, fine-tune every other model, write the zoo.

The build is a list of training jobs, run in parallel worker processes, one thread each. The
fine-tunes start from the base, so they wait for it; the models trained from their own random
initialisation run beside the base. Each job seeds its own generators from
``(zoo seed, job name)``, so the bytes of a model do not depend on the number of workers.

A zoo is cached by its content hash: a hash of the zoo's source code, the size and the seed.
Building into a folder that already holds the same zoo returns it at once; a folder holding a zoo
of another hash is rebuilt. The zoo is assembled in a staging folder beside the target and moved
into place at the end, so an interrupted build never leaves a half-written zoo behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeforge.cache import cache_root
from mergeforge.zoo.manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    Zoo,
    ZooError,
    ZooModel,
    ZooTaskEntry,
    load_zoo,
    write_manifest,
)
from mergeforge.zoo.presets import PRESETS, ChatZooPreset, ZooPreset
from mergeforge.zoo.train import TrainingSchedule

Log = Callable[[str], None]

# Modules whose source defines what a zoo holds; editing any of them changes every content hash
# (and renaming one is an error here, not a silently stale cache). ``zoo.presets`` is not among
# them: each zoo hashes its own preset's values instead, so retuning one size leaves the other
# sizes' cached zoos valid.
_HASHED_MODULES = (
    "mergeforge.zoo.tasks", "mergeforge.zoo.tokenizer", "mergeforge.zoo.train", "mergeforge.zoo.data", "mergeforge.zoo.lora",
    "mergeforge.zoo.build", "mergeforge.zoo.manifest", "mergeforge.tasks.encoding", "mergeforge.tasks.folders",
    "mergeforge.checkpoint.peft", "mergeforge.zoo.chat_tasks", "mergeforge.zoo.chat_build", "mergeforge.zoo.pretrained",
)


@dataclass(frozen=True)
class TrainJob:
    """One model to train."""

    name: str
    role: str  # see mergeforge.zoo.manifest
    data: str  # "pretrain", "multitask", "behavior" or "task:<name>"
    schedule: TrainingSchedule
    from_base: bool  # start from the base model (else from a fresh random initialisation)
    init_seed: int = 0  # seed of the random initialisation (from_base False only)
    task: str | None = None
    lora: bool = False
    eval_tasks: tuple[str, ...] = ()  # validation tasks scored right after training


def zoo_content_hash(size: str, seed: int) -> str:
    """sha256 over the zoo's code, the size's preset and the seed."""
    digest = hashlib.sha256()
    digest.update(f"mergeforge-zoo format {MANIFEST_FORMAT} size {size} seed {seed}\n".encode())
    digest.update(json.dumps(PRESETS[size].fingerprint(), sort_keys=True).encode())
    for module in _HASHED_MODULES:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        digest.update(f"{module}\n".encode())
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()


def default_zoo_dir(size: str = "tiny", seed: int = 0) -> Path:
    """Where :func:`build_zoo` puts a zoo when no folder is given: one folder per content hash."""
    return cache_root() / "zoo" / f"{size}-seed{seed}-{zoo_content_hash(size, seed)[:12]}"


def job_seed(zoo_seed: int, name: str) -> int:
    """A 31-bit seed per (zoo seed, job name), independent of job order."""
    return int(hashlib.sha256(f"{zoo_seed}/{name}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def plan_jobs(preset: ZooPreset, skills: list[str], seed: int) -> tuple[TrainJob, list[TrainJob]]:
    """The base job and every job that follows it."""
    base = TrainJob("base", "base", "pretrain", preset.pretrain, from_base=False, init_seed=job_seed(seed, "init/base"),
                    eval_tasks=(*skills, "echo", "spam"))
    jobs = [TrainJob(f"expert_{task}", "expert", f"task:{task}", preset.expert, True, task=task, eval_tasks=(task,))
            for task in skills]
    jobs.append(TrainJob("multitask", "multitask", "multitask", preset.multitask, True, eval_tasks=tuple(skills)))
    jobs.append(TrainJob("behavior_spam", "behavior", "behavior", preset.behavior, True, task="spam",
                         eval_tasks=("echo", "spam")))
    for letter in ("a", "b"):
        name = f"scratch_{preset.scratch_task}_{letter}"
        jobs.append(TrainJob(name, "scratch", f"task:{preset.scratch_task}", preset.scratch, False,
                             init_seed=job_seed(seed, f"init/{name}"), task=preset.scratch_task,
                             eval_tasks=(preset.scratch_task,)))
    for task in preset.lora.tasks:
        jobs.append(TrainJob(f"lora_{task}", "lora", f"task:{task}", preset.lora.schedule, True, task=task, lora=True,
                             eval_tasks=(task,)))
    return base, jobs


def llama_config(preset: ZooPreset, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    shape = preset.shape
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def run_job(job: TrainJob, size: str, seed: int, root: str) -> dict[str, Any]:
    """Train one model and save it under ``root/models/<name>``; returns its build record.

    Runs in a worker process (or the main one): everything it needs is regenerated from
    ``(size, seed)`` or read from ``root``.
    """
    import torch

    started = time.perf_counter()
    torch.set_num_threads(1)
    _quiet_transformers()
    preset = PRESETS[size]
    zoo_root = Path(root)
    if isinstance(preset, ChatZooPreset):
        from mergeforge.zoo.chat_build import run_chat_job

        model, tokenizer, examples, final_loss = run_chat_job(job, preset, seed, zoo_root)
    else:
        model, tokenizer, examples, final_loss = _train_generated(job, preset, seed, zoo_root)
    trained_seconds = time.perf_counter() - started
    scores = _validation_scores(model, tokenizer, zoo_root, job.eval_tasks)
    return {
        "name": job.name,
        "steps": job.schedule.steps,
        "examples": examples,
        "final_loss": round(final_loss, 5),
        "train_seconds": round(trained_seconds, 2),
        "eval_seconds": round(time.perf_counter() - started - trained_seconds, 2),
        "validation": scores,
    }


def _train_generated(job: TrainJob, preset: ZooPreset, seed: int, zoo_root: Path) -> tuple[Any, Any, int, float]:
    """One model of a generated zoo: pretrained from scratch, or fine-tuned from its base."""
    import torch
    from transformers import LlamaForCausalLM

    from mergeforge.checkpoint.peft import save_adapter
    from mergeforge.zoo import data as zoo_data
    from mergeforge.zoo.lora import attach_lora, lora_state_dict
    from mergeforge.zoo.tokenizer import build_tokenizer, save_tokenizer
    from mergeforge.zoo.train import encode_training_data, train

    task_data, _ = zoo_data.make_task_data(preset, seed)
    tokenizer = build_tokenizer()
    if job.data == "pretrain":
        pairs = zoo_data.pretraining_corpus(task_data, seed)
    elif job.data == "multitask":
        pairs = zoo_data.multitask_training_set(task_data)
    elif job.data == "behavior":
        pairs = zoo_data.behavior_training_set(task_data)
    else:
        pairs = task_data[job.data.removeprefix("task:")].splits["train"]
    # Pretraining models the whole text; fine-tuning only the answers, except for models trained
    # from scratch, which must also learn the prompt format.
    encoded = encode_training_data(tokenizer, pairs, loss_on_prompt=not job.from_base)
    if job.from_base:
        model = LlamaForCausalLM.from_pretrained(zoo_root / "models" / "base", dtype=torch.float32)
    else:
        torch.manual_seed(job.init_seed)
        model = LlamaForCausalLM(llama_config(preset, tokenizer))
    if job.lora:
        lora = preset.lora
        attach_lora(model, lora.target_modules, lora.rank, lora.alpha, job_seed(seed, f"lora-init/{job.name}"))
    final_loss = train(model, encoded, job.schedule, job_seed(seed, f"batches/{job.name}"))
    folder = zoo_root / "models" / job.name
    if job.lora:
        save_adapter(folder, lora_state_dict(model), preset.lora.rank, preset.lora.alpha, preset.lora.target_modules, "../base")
    else:
        model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return model, tokenizer, len(encoded), final_loss


def _quiet_transformers() -> None:
    """No per-model progress bars or load reports: the build prints one line per model."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _validation_scores(model: Any, tokenizer: Any, root: Path, tasks: tuple[str, ...]) -> dict[str, float]:
    from mergeforge.evaluate.api import evaluate_model
    from mergeforge.tasks.folders import load_task

    if not tasks:
        return {}
    result = evaluate_model(model, [load_task(root / "tasks" / name) for name in tasks], split="val",
                            tokenizer=tokenizer, with_loss=False)
    return {name: round(entry["score"], 4) for name, entry in result["tasks"].items()}


def _write_tasks(preset: ZooPreset, seed: int, staging: Path) -> dict[str, ZooTaskEntry]:
    from mergeforge.tasks.folders import TaskSpec, write_task
    from mergeforge.zoo.data import make_task_data

    task_data, _ = make_task_data(preset, seed)
    entries: dict[str, ZooTaskEntry] = {}
    for name, data in task_data.items():
        spec = TaskSpec(name=name, max_new_tokens=data.task.max_new_tokens, metric=data.task.metric,
                        description=data.task.description)
        folder = staging / "tasks" / name
        write_task(folder, spec, data.splits)
        entries[name] = ZooTaskEntry(name, data.role, folder, data.task.description)
    return entries


def _model_entry(job: TrainJob, staging: Path, seed: int) -> ZooModel:
    return ZooModel(
        name=job.name, role=job.role, path=staging / "models" / job.name, task=job.task,
        parent="base" if job.from_base else None, format="peft" if job.lora else "hf",
        seed=job.init_seed if not job.from_base else job_seed(seed, f"batches/{job.name}"),
    )


def _run_all(base_job: TrainJob | None, jobs: list[TrainJob], size: str, seed: int, staging: Path, workers: int,
             log: Log, started: float) -> list[dict[str, Any]]:
    """Train every model. The jobs that start from their own random initialisation run beside the
    base; the fine-tunes of the base start once it is saved (at once when ``base_job`` is None:
    the base is already in place)."""

    every = [*([base_job] if base_job is not None else []), *jobs]
    work = {job.name: job.schedule.steps * job.schedule.batch_size for job in every}  # examples seen: the cost
    total = sum(work.values())
    done = [0]
    first = time.perf_counter()

    def report(record: dict[str, Any]) -> None:
        scores = ", ".join(f"{task} {score:.0%}" for task, score in record["validation"].items())
        done[0] += work[record["name"]]
        elapsed = time.perf_counter() - first
        left = f"; about {elapsed * (total - done[0]) / done[0] / 60:.0f} min left" if 0 < done[0] < total else ""
        log(f"[{time.perf_counter() - started:6.1f}s] {record['name']}: {record['steps']} steps, "
            f"loss {record['final_loss']:.3f}; val {scores} ({len(records)}/{len(every)} models{left})")

    def longest_first(selected: list[TrainJob]) -> list[TrainJob]:  # so the workers end together
        return sorted(selected, key=lambda job: -job.schedule.steps * job.schedule.batch_size)

    independent = longest_first([job for job in jobs if not job.from_base])
    fine_tunes = longest_first([job for job in jobs if job.from_base])
    records: list[dict[str, Any]] = []
    if workers <= 1:
        for job in every:
            records.append(run_job(job, size, seed, str(staging)))
            report(records[-1])
        return records
    import multiprocessing

    # spawn, not fork: the parent has torch's thread pools running.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        if base_job is None:
            futures = [pool.submit(run_job, job, size, seed, str(staging)) for job in (*fine_tunes, *independent)]
        else:
            base_future = pool.submit(run_job, base_job, size, seed, str(staging))
            futures = [pool.submit(run_job, job, size, seed, str(staging)) for job in independent]
            records.append(base_future.result())
            report(records[-1])
            futures += [pool.submit(run_job, job, size, seed, str(staging)) for job in fine_tunes]
        for future in as_completed(futures):  # reported as they finish, not in submission order
            records.append(future.result())
            report(records[-1])
    return records


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def build_zoo(
    directory: str | Path | None = None,
    size: str = "tiny",
    seed: int = 0,
    *,
    workers: int | None = None,
    force: bool = False,
    log: Log | None = None,
) -> Zoo:
    """Build (or fetch from cache) the zoo of ``size`` and ``seed`` in ``directory``.

    Arguments:
        directory: the zoo folder; default :func:`default_zoo_dir` (under ``~/.cache/mergeforge``).
            It must be new, empty, or hold a zoo (which is reused if its content hash matches,
            else replaced).
        size: a name in :data:`mergeforge.zoo.presets.PRESETS`: ``tiny`` (tests), ``small``
            (the generated benchmark zoo), ``smollm2`` (fine-tunes of SmolLM2-135M-Instruct) or
            ``smollm2-demo`` (its 3-expert build for the demo).
        seed: every random choice (data, initialisations, batches) follows from it.
        workers: processes for the jobs after the base (default: up to 2, one per core).
        force: rebuild even if the folder holds this very zoo.
        log: called with one line per finished model.

    Returns:
        The :class:`Zoo`.

    Example:
        >>> zoo = build_zoo("zoo/", size="tiny", seed=0)
        >>> zoo.expert("reverse").path
    """
    if size not in PRESETS:
        raise ZooError(f"unknown zoo size '{size}'; choose one of {', '.join(PRESETS)}")
    log = log or (lambda line: None)
    content_hash = zoo_content_hash(size, seed)
    root = Path(directory).absolute() if directory is not None else default_zoo_dir(size, seed)
    if (root / MANIFEST).is_file() and not force:
        try:
            cached = load_zoo(root)
            if cached.content_hash == content_hash:
                log(f"zoo {size} seed {seed} is up to date in {root}")
                return cached
        except ZooError:
            pass
        log(f"{root} holds another zoo (or a broken one); rebuilding")
    if root.exists() and not root.is_dir():
        raise ZooError(f"{root}: exists and is not a folder; pass a new or empty folder")
    if root.is_dir() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise ZooError(f"{root}: folder is not empty and holds no zoo; pass a new or empty folder")

    import torch

    started = time.perf_counter()
    preset = PRESETS[size]
    workers = default_workers() if workers is None else max(1, workers)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    threads = torch.get_num_threads()
    try:
        base_job: TrainJob | None
        if isinstance(preset, ChatZooPreset):
            from mergeforge.zoo import chat_build
            from mergeforge.zoo.pretrained import prepare_base

            base_dir = prepare_base(preset.base, log)
            chat_build.copy_base(base_dir, staging)
            tasks = chat_build.write_chat_tasks(preset, seed, staging, base_dir, log)
            base_job, jobs = None, chat_build.plan_chat_jobs(preset, seed)
        else:
            tasks = _write_tasks(preset, seed, staging)
            skills = [name for name, entry in tasks.items() if entry.role == "skill"]
            base_job, jobs = plan_jobs(preset, skills, seed)
        ordered = [*([base_job] if base_job is not None else []), *jobs]
        log(f"building zoo {size} (seed {seed}, {len(ordered)} models, {workers} worker(s)) in {root}")
        records = _run_all(base_job, jobs, size, seed, staging, workers, log, started)
        by_name = {record["name"]: record for record in records}
        models = {job.name: _model_entry(job, staging, seed) for job in ordered}
        info = {
            "build": {
                "seconds": round(time.perf_counter() - started, 1),
                "workers": workers,
                "torch": torch.__version__,
                "preset": preset.fingerprint(),
            },
            "training": {name: {k: v for k, v in by_name[name].items() if k not in ("name", "validation")} for name in models},
            "validation": {name: by_name[name]["validation"] for name in models},
        }
        zoo = Zoo(staging, size, seed, content_hash, models, tasks, info)
        write_manifest(zoo)
        _move_into_place(staging, root, content_hash)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    log(f"[{time.perf_counter() - started:6.1f}s] zoo written to {root}")
    return load_zoo(root)


def _move_into_place(staging: Path, root: Path, content_hash: str) -> None:
    """Replace ``root`` by ``staging``; a concurrent build of the same zoo that finished first wins."""
    if (root / MANIFEST).is_file():
        try:
            if json.loads((root / MANIFEST).read_text()).get("content_hash") == content_hash:
                return
        except (OSError, json.JSONDecodeError):
            pass
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    if root.exists():
        root.rename(old)
    staging.rename(root)
    shutil.rmtree(old, ignore_errors=True)
