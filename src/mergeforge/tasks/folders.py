"""Task definitions: a folder with ``spec.json`` and one JSONL file per split.

A task folder looks like::

    mytask/
      spec.json      {"name": "mytask", "max_new_tokens": 8, "metric": "exact_match"}
      train.jsonl    {"prompt": "rev:abc=", "answer": "cba"}   one object per line
      val.jsonl
      test.jsonl

``spec.json`` fields: ``name`` (required), ``prompt_key`` and ``answer_key`` (the JSONL fields,
default ``prompt`` / ``answer``), ``max_new_tokens`` (default 32), ``metric`` (``exact_match``:
the stripped generation equals the stripped answer; ``contains``: the generation contains the
answer), ``stop`` (strings that end a generation early, default none), ``description``,
``chat`` (send each prompt as a user message in the model's chat template, default false) and
``system`` (the system message sent with it, when ``chat`` is true).
Unknown fields are an error, so a typo cannot be silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergeforge.errors import MergeforgeError
from mergeforge.tasks.jsonl import json_records

SPLITS = ("train", "val", "test")


class TaskError(MergeforgeError):
    """A task folder, spec or JSONL file is missing or malformed, or a task name is unknown."""


class TaskSpec(BaseModel):
    """The contents of ``spec.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    metric: Literal["exact_match", "contains"] = "exact_match"
    stop: tuple[str, ...] = ()
    description: str = ""
    chat: bool = False
    system: str | None = None


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A task: its spec and the folder holding its splits."""

    spec: TaskSpec
    folder: Path

    @property
    def name(self) -> str:
        return self.spec.name

    def split_path(self, split: str) -> Path:
        return self.folder / f"{split}.jsonl"

    def examples(self, split: str = "test", max_examples: int | None = None) -> list[Example]:
        """The examples of one split, in file order (the first ``max_examples`` if given)."""
        path = self.split_path(split)
        if not path.is_file():
            available = sorted(p.stem for p in self.folder.glob("*.jsonl"))
            raise TaskError(
                f"{path}: no such split file; task '{self.name}' has splits {available or 'none'}"
            )
        return read_examples(path, self.spec, max_examples)


def read_examples(path: Path, spec: TaskSpec, max_examples: int | None = None) -> list[Example]:
    """Parse a JSONL file; every error names the file and line."""
    examples: list[Example] = []
    for where, record in json_records(path, TaskError, f"the examples of task '{spec.name}'"):
        if max_examples is not None and len(examples) >= max_examples:
            break
        fields = []
        for key in (spec.prompt_key, spec.answer_key):
            if key not in record:
                raise TaskError(f"{where}: missing field '{key}' (spec.json of task '{spec.name}' names it)")
            if not isinstance(record[key], str):
                raise TaskError(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}")
            fields.append(record[key])
        examples.append(Example(*fields))
    if not examples:
        raise TaskError(f"{path}: no examples; add JSON lines with '{spec.prompt_key}' and '{spec.answer_key}'")
    return examples


def load_task(folder: str | Path) -> Task:
    """Read the task in ``folder`` (which must hold ``spec.json``)."""
    folder = Path(folder)
    spec_path = folder / "spec.json"
    if not folder.is_dir():
        raise TaskError(f"{folder}: task folder not found")
    if not spec_path.is_file():
        raise TaskError(f"{spec_path}: missing; a task folder needs a spec.json with at least a 'name'")
    try:
        raw = json.loads(spec_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskError(f"{spec_path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise TaskError(f"{spec_path}: not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{spec_path}: expected a JSON object")
    try:
        spec = TaskSpec(**raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'spec'}: {error['msg']}"
            for error in exc.errors()
        )
        raise TaskError(f"{spec_path}: {problems}") from None
    return Task(spec, folder)


def discover_tasks(path: str | Path) -> list[Task]:
    """The task at ``path`` if it holds ``spec.json``, else every task folder directly inside it."""
    path = Path(path)
    if not path.is_dir():
        raise TaskError(f"{path}: task folder not found")
    if (path / "spec.json").is_file():
        return [load_task(path)]
    tasks = [load_task(child) for child in sorted(path.iterdir()) if (child / "spec.json").is_file()]
    if not tasks:
        raise TaskError(f"{path}: no spec.json here nor in any folder directly inside")
    return tasks


def select_tasks(available: Sequence[Task], names: str | Sequence[str], default_all: Sequence[str] | None = None) -> list[Task]:
    """Pick tasks by name. ``"all"`` means ``default_all`` (or every available task);
    a comma-separated string is split. Unknown names raise :class:`TaskError` listing the known."""
    by_name = {task.name: task for task in available}
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    chosen: list[Task] = []
    for name in names:
        if name == "all":
            wanted = list(default_all) if default_all is not None else list(by_name)
            chosen.extend(by_name[w] for w in wanted if by_name[w] not in chosen)
            continue
        if name not in by_name:
            raise TaskError(f"unknown task '{name}'; known tasks: {', '.join(sorted(by_name)) or 'none'}")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    if not chosen:
        raise TaskError("no task selected; name at least one task or 'all'")
    return chosen


def write_task(folder: Path, spec: TaskSpec, splits: Mapping[str, Sequence[tuple[str, str]]]) -> Task:
    """Write ``spec.json`` and one JSONL file per split (used by the zoo, handy for users)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_data = spec.model_dump()
    spec_data["stop"] = list(spec_data["stop"])
    (folder / "spec.json").write_text(json.dumps(spec_data, indent=2) + "\n", encoding="utf-8")
    for split, pairs in splits.items():
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for prompt, answer in pairs:
                handle.write(json.dumps({spec.prompt_key: prompt, spec.answer_key: answer}) + "\n")
    return Task(spec, folder)


def find_zoo_root(model_dir: Path) -> Path | None:
    """The zoo holding ``model_dir`` (a folder up to two levels above with a ``manifest.json``
    and a ``tasks/`` folder), else None."""
    for candidate in (model_dir, *list(model_dir.absolute().parents)[:2]):
        if (candidate / "manifest.json").is_file() and (candidate / "tasks").is_dir():
            return candidate
    return None


def resolve_tasks(names: str | Sequence[str], task_root: str | Path | None = None, model_dir: str | Path | None = None) -> list[Task]:
    """Tasks from a comma-separated string (or list) of task folders and task names.

    A name that is a folder with ``spec.json`` is that task; a folder of task folders gives all of
    them. Other names are looked up in ``task_root`` (default: the ``tasks/`` folder of the zoo
    that holds ``model_dir``); ``all`` means every task there.
    """
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if not names:
        raise TaskError("no task given; pass task folders or names (e.g. --tasks reverse,sort or --tasks all)")
    root: Path | None = Path(task_root) if task_root is not None else None
    if root is None and model_dir is not None:
        zoo_root = find_zoo_root(Path(model_dir))
        root = zoo_root / "tasks" if zoo_root is not None else None
    available: list[Task] | None = None
    chosen: list[Task] = []
    for name in names:
        path = Path(name)
        if name != "all" and path.is_dir():
            found = discover_tasks(path)
        else:
            if root is None:
                raise TaskError(f"task '{name}' is not a task folder, and there is no task root to look it up in; "
                                "pass a folder with spec.json, or --task-root")
            if available is None:
                available = discover_tasks(root)
            found = select_tasks(available, [name])
        chosen.extend(task for task in found if task not in chosen)
    return chosen
