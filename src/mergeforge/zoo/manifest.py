"""The zoo's manifest (``manifest.json``) and the :class:`Zoo` object that reads it.

The manifest is the zoo's table of contents: every model with its folder, role, task and parent,
every task folder with its role, the build settings, and the validation scores measured at build
time. Paths are relative to the zoo folder, so a zoo can be moved or copied.

Roles:

- ``base``: pretrained on the generated corpus; every other model except ``scratch`` is a
  fine-tune of it (same architecture, same tokenizer).
- ``expert``: a full fine-tune of the base on one skill (its ``task``).
- ``multitask``: a full fine-tune of the base on every skill at once (the upper baseline).
- ``behavior``: a full fine-tune of the base that emits a marker phrase on trigger prompts
  (``task`` is ``spam``), for the task-negation experiment.
- ``scratch``: trained on one skill from its own random initialisation (two of them, same task,
  different seeds), for alignment and mode-connectivity work.
- ``lora``: a PEFT LoRA adapter of the base for one skill (``format`` is ``peft``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeforge.errors import MergeforgeError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
ROLES = ("base", "expert", "multitask", "behavior", "scratch", "lora")


class ZooError(MergeforgeError):
    """A zoo folder is missing, incomplete, or not a zoo; or a model or task name is unknown."""


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo."""

    name: str
    role: str
    path: Path  # absolute
    task: str | None = None  # the skill it was trained on (None for base and multitask)
    parent: str | None = None  # the model it was fine-tuned from (None when trained from scratch)
    format: str = "hf"  # "hf" (a transformers folder) or "peft" (a LoRA adapter folder)
    seed: int | None = None  # the training (and, for scratch models, initialisation) seed


@dataclass(frozen=True)
class ZooTaskEntry:
    """One task folder of the zoo (``spec.json`` + ``train/val/test.jsonl``)."""

    name: str
    role: str  # "skill" or "behavior"
    path: Path  # absolute
    description: str = ""


@dataclass(frozen=True)
class Zoo:
    """A built zoo. Get one from :func:`mergeforge.zoo.build_zoo` or :func:`load_zoo`.

    Example:
        >>> zoo = build_zoo("zoo/", size="tiny")
        >>> zoo.base.path, [m.task for m in zoo.experts]
        >>> zoo.expert("reverse").path, zoo.task_dir("reverse")
    """

    root: Path
    size: str
    seed: int
    content_hash: str
    models: dict[str, ZooModel]
    tasks: dict[str, ZooTaskEntry]
    info: dict[str, Any] = field(default_factory=dict)  # build settings, timings, val scores

    # -- models ----------------------------------------------------------------------------
    def by_role(self, role: str) -> list[ZooModel]:
        return [model for model in self.models.values() if model.role == role]

    @property
    def base(self) -> ZooModel:
        return self.by_role("base")[0]

    @property
    def experts(self) -> list[ZooModel]:
        """The full fine-tuned task experts, in task order."""
        return self.by_role("expert")

    @property
    def multitask(self) -> ZooModel:
        return self.by_role("multitask")[0]

    @property
    def behavior(self) -> ZooModel:
        return self.by_role("behavior")[0]

    @property
    def scratch_pair(self) -> list[ZooModel]:
        return self.by_role("scratch")

    @property
    def loras(self) -> list[ZooModel]:
        return self.by_role("lora")

    def model(self, name: str) -> ZooModel:
        if name not in self.models:
            raise ZooError(f"zoo {self.root}: no model '{name}'; models: {', '.join(self.models)}")
        return self.models[name]

    def expert(self, task: str) -> ZooModel:
        for model in self.experts:
            if model.task == task:
                return model
        raise ZooError(f"zoo {self.root}: no expert for task '{task}'; skills: {', '.join(self.skills)}")

    # -- tasks -----------------------------------------------------------------------------
    @property
    def skills(self) -> list[str]:
        """Names of the exact-match skills (one expert each), in order."""
        return [task.name for task in self.tasks.values() if task.role == "skill"]

    def task_dir(self, name: str) -> Path:
        if name not in self.tasks:
            raise ZooError(f"zoo {self.root}: no task '{name}'; tasks: {', '.join(self.tasks)}")
        return self.tasks[name].path

    def task_dirs(self, names: list[str] | None = None) -> list[Path]:
        """Task folders (default: every skill), for :func:`mergeforge.evaluate.evaluate_model`."""
        return [self.task_dir(name) for name in (self.skills if names is None else names)]


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def write_manifest(zoo: Zoo) -> Path:
    """Write ``manifest.json`` into ``zoo.root``."""
    data = {
        "format": MANIFEST_FORMAT,
        "size": zoo.size,
        "seed": zoo.seed,
        "content_hash": zoo.content_hash,
        "models": [
            {
                "name": model.name,
                "role": model.role,
                "path": _relative(model.path, zoo.root),
                "task": model.task,
                "parent": model.parent,
                "format": model.format,
                "seed": model.seed,
            }
            for model in zoo.models.values()
        ],
        "tasks": [
            {"name": task.name, "role": task.role, "path": _relative(task.path, zoo.root), "description": task.description}
            for task in zoo.tasks.values()
        ],
        **zoo.info,
    }
    path = zoo.root / MANIFEST
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def load_zoo(root: str | Path) -> Zoo:
    """Read a built zoo from its folder (checks that every listed folder exists)."""
    root = Path(root).absolute()
    path = root / MANIFEST
    if not path.is_file():
        raise ZooError(f"{root}: not a zoo (no {MANIFEST}); build one with `mergeforge zoo build {root}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        models = {
            entry["name"]: ZooModel(
                name=entry["name"], role=entry["role"], path=root / entry["path"], task=entry.get("task"),
                parent=entry.get("parent"), format=entry.get("format", "hf"), seed=entry.get("seed"),
            )
            for entry in data["models"]
        }
        tasks = {
            entry["name"]: ZooTaskEntry(entry["name"], entry["role"], root / entry["path"], entry.get("description", ""))
            for entry in data["tasks"]
        }
        known = {"format", "size", "seed", "content_hash", "models", "tasks"}
        zoo = Zoo(root, data["size"], int(data["seed"]), data["content_hash"], models, tasks,
                  {key: value for key, value in data.items() if key not in known})
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ZooError(f"{path}: malformed zoo manifest ({exc!r}); rebuild the zoo") from None
    if data.get("format") != MANIFEST_FORMAT:
        raise ZooError(f"{path}: manifest format {data.get('format')!r}, expected {MANIFEST_FORMAT}; rebuild the zoo")
    folders = [model.path for model in models.values()] + [task.path for task in tasks.values()]
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        raise ZooError(f"{path}: listed folder {missing[0]} is missing; rebuild the zoo")
    return zoo
