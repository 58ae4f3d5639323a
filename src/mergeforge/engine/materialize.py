"""Rebuild one task's model from a merged folder that stores per-task masks (EMR merging, TALL
masks; see :mod:`mergeforge.methods.task_masks`), for ``mergeforge emr materialize``:

    θ_task = θ_base + scale_task · mask_task ⊙ (θ_merged − θ_base)

Tensors without masks (copied, non-float) come from the merged folder unchanged. The result is a
complete Hugging Face folder: the merged folder's config and tokenizer files plus the task's
weights, written atomically like a merge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mergeforge.checkpoint import folder as folder_files
from mergeforge.checkpoint.reader import Checkpoint, SafetensorsFile, TensorInfo
from mergeforge.checkpoint.safetensors_format import resolve_model_path
from mergeforge.checkpoint.writer import DEFAULT_SHARD_BYTES, OutputTensor, ShardedWriter
from mergeforge.engine.output import RECIPE_FILE, SIDE_FOLDER
from mergeforge.errors import CheckpointError, MergeforgeError, OutputError
from mergeforge.methods import task_masks
from mergeforge.methods.registry import SIDE_SEPARATOR

# Files of the merged folder that describe the merge, not the task model.
NOT_COPIED = {"README.md", RECIPE_FILE}


class SideTensors:
    """The side checkpoint of a merged folder (``mergeforge_side/side*.safetensors``)."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("side*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no side*.safetensors files; the merged folder is incomplete")
        self.files = [SafetensorsFile(path) for path in files]
        self.infos: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
        for file in self.files:
            for name, info in file.tensors.items():
                self.infos[name] = (file, info)

    def read(self, name: str) -> torch.Tensor | None:
        if name not in self.infos:
            return None
        file, info = self.infos[name]
        return file.read(info)

    def close(self) -> None:
        for file in self.files:
            file.close()


def _recipe(merged_dir: Path) -> dict:
    import yaml

    path = merged_dir / RECIPE_FILE
    if not path.is_file():
        raise CheckpointError(f"{merged_dir}: no {RECIPE_FILE}; give the output folder of a `mergeforge merge` with merge_method emr or tall_mask")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: not valid YAML ({exc}); the merged folder is damaged") from None
    if not isinstance(recipe, dict):
        raise CheckpointError(f"{path}: not a recipe mapping; the merged folder is damaged")
    return recipe


def _task_names(recipe: dict) -> list[str]:
    base = recipe.get("base_model")
    return [str(entry.get("model")) for entry in recipe.get("models") or [] if isinstance(entry, dict) and entry.get("model") != base]


def _base_folder(recipe: dict, merged_dir: Path, base: str | Path | None) -> Path:
    if base is not None:
        return resolve_model_path(str(base))
    reference = recipe.get("base_model")
    if not reference:
        raise CheckpointError(f"{merged_dir / RECIPE_FILE}: the recipe names no base_model; pass --base PATH")
    for relative_to in (None, merged_dir.resolve().parent):
        try:
            return resolve_model_path(str(reference), relative_to)
        except CheckpointError:
            continue
    raise CheckpointError(
        f"base model '{reference}' (from {merged_dir / RECIPE_FILE}) not found from here; pass --base PATH to the base model"
    )


def _copy_other_files(merged_dir: Path, out: Path) -> None:
    for entry in sorted(merged_dir.iterdir()):
        name = entry.name
        if name in NOT_COPIED or name == SIDE_FOLDER or name.startswith(".") or name.endswith(folder_files.WEIGHT_SUFFIXES):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / name, symlinks=False)
        else:
            shutil.copy2(entry, out / name)


def materialize_task(
    merged_dir: str | Path,
    task: int,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write task ``task``'s model (0-based, in recipe order) of an EMR or TALL-mask merge.

    Arguments:
        merged_dir: the output folder of ``mergeforge merge`` with ``merge_method: emr`` or ``tall_mask``.
        task: which input model, counting from 0 in the recipe's order (the base excluded).
        out_dir: where the task's model folder goes (must be empty unless ``overwrite``).
        base: the base model folder; default: the recipe's ``base_model``.
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a path.

    Example:
        >>> materialize_task("merged/", 1, "task1/")
    """
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if not merged_dir.is_dir():
        raise CheckpointError(f"{merged_dir}: folder not found")
    recipe = _recipe(merged_dir)
    side_folder = merged_dir / SIDE_FOLDER
    if not side_folder.is_dir():
        raise CheckpointError(
            f"{merged_dir}: no {SIDE_FOLDER}/ folder: made with merge_method '{recipe.get('merge_method')}', which stores no "
            "per-task masks; materialize needs the output of merge_method emr or tall_mask"
        )
    base_folder = _base_folder(recipe, merged_dir, base)
    folder_files.check_output_location(out_dir, [merged_dir, base_folder], overwrite)
    side = SideTensors(side_folder)
    merged = Checkpoint(merged_dir)
    base_checkpoint = Checkpoint(base_folder, str(base_folder))
    try:
        scales_names = [name for name in side.infos if name.endswith(SIDE_SEPARATOR + task_masks.SCALES)]
        if not scales_names:
            raise CheckpointError(f"{side_folder}: holds no per-task scales; the merged folder is damaged")
        n_tasks = side.infos[scales_names[0]][1].shape[0]
        if not 0 <= task < n_tasks:
            names = _task_names(recipe)
            listing = ", ".join(f"{i}: {name}" for i, name in enumerate(names)) if len(names) == n_tasks else f"0..{n_tasks - 1}"
            raise MergeforgeError(f"--task {task}: the merge has {n_tasks} task models ({listing}); choose one of them")
        names = merged.names()
        outputs = [OutputTensor(name, merged.info(name).shape, merged.info(name).dtype) for name in names]
        with folder_files.atomic_output_folder(out_dir) as temp:
            writer = ShardedWriter(temp, outputs, DEFAULT_SHARD_BYTES)
            try:
                for name in names:
                    writer.write(name, _task_tensor(name, task, merged, base_checkpoint, side))
            finally:
                writer.close()
            _copy_other_files(merged_dir, temp)
            provenance = {"materialized_from": str(merged_dir.resolve()), "task": task, "merge_method": recipe.get("merge_method")}
            task_names = _task_names(recipe)
            if len(task_names) == n_tasks:
                provenance["model"] = task_names[task]
            (temp / "mergeforge_task.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write: {exc.strerror}") from None
    finally:
        side.close()
        merged.close()
        base_checkpoint.close()
    return out_dir


def _task_tensor(name: str, task: int, merged: Checkpoint, base: Checkpoint, side: SideTensors) -> torch.Tensor:
    merged_tensor = merged.read(name)
    packed = side.read(name + SIDE_SEPARATOR + task_masks.MASKS)
    if packed is None:
        return merged_tensor
    scales = side.read(name + SIDE_SEPARATOR + task_masks.SCALES)
    if scales is None or packed.shape[0] != scales.shape[0] or task >= packed.shape[0]:
        raise CheckpointError(f"side tensors of '{name}' are incomplete; the merged folder is damaged")
    if not base.has(name):
        raise CheckpointError(f"base model {base.folder}: has no tensor '{name}'; is --base the model this merge used?")
    base_tensor = base.read(name)
    if base_tensor.shape != merged_tensor.shape:
        raise CheckpointError(
            f"base model {base.folder}: tensor '{name}' has shape {list(base_tensor.shape)}, the merge has "
            f"{list(merged_tensor.shape)}; is --base the model this merge used?"
        )
    if packed.shape[1] != task_masks.packed_length(merged_tensor.numel()):
        raise CheckpointError(f"side tensor '{name}{SIDE_SEPARATOR}{task_masks.MASKS}' does not match the tensor's size; the merged folder is damaged")
    return task_masks.task_tensor(merged_tensor, base_tensor, packed, scales, task)
