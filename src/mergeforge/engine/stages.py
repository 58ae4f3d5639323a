"""Multi-stage recipes: mergekit-multi's multi-document YAML, run by ``mergeforge merge`` itself.

A file of ``---``-separated documents, each an ordinary recipe. A document's ``name:`` names its
stage; any later (or earlier) document may use that name wherever it names a model (``base_model``,
``models[].model``, a slice source, ``tokenizer_source``), and reads that stage's output. Exactly
one document has no name: the final merge, written to the output folder. Stages run one after
another in dependency order, through the same :func:`~mergeforge.engine.api.merge_recipe` as any
merge; their outputs go to a temporary folder beside the output (deleted at the end), or to
``--intermediate-dir DIR`` as ``DIR/<name>``, kept.

As in mergekit-multi, a stage name wins over a folder of the same name, and the name is also the
stage's model-card title. Unlike it, an existing ``DIR/<name>`` is not silently reused (its recipe
or inputs may have changed): it is an error unless ``--overwrite``. A named stage that the final
merge does not need is skipped, with a warning, unless ``--intermediate-dir`` keeps it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeforge.checkpoint import folder as folder_files
from mergeforge.engine.options import MergeOptions
from mergeforge.engine.output import MergeResult
from mergeforge.engine.progress import announce
from mergeforge.engine.recipe import Recipe, parse_yaml_documents, read_recipe_text, validate_recipe
from mergeforge.errors import OutputError, RecipeError, closest

log = logging.getLogger("mergeforge")

# A stage name becomes a folder name: no separators, no leading dot.
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage recipe."""

    name: str | None  # None: the final merge
    recipe: Recipe
    document: int  # 1-based position in the file, for messages
    needs: frozenset[str]  # the names of the stages it reads

    @property
    def label(self) -> str:
        return f"document {self.document} ('{self.name}')" if self.name else f"document {self.document} (the final merge)"


def read_stages(recipe: Any) -> list[Stage] | None:
    """The stages of a YAML recipe (path or text) with more than one document, else ``None``.

    Every document is validated here, and the names: duplicates, two unnamed documents (or none),
    references to misspelt stage names, and cycles are all refused before anything is merged.
    """
    if not isinstance(recipe, (str, bytes)) and not hasattr(recipe, "__fspath__"):
        return None
    text, source = read_recipe_text(recipe)
    documents = [(number, data) for number, data in enumerate(parse_yaml_documents(text, source), 1) if data is not None]
    if len(documents) < 2:
        return None
    names = [_stage_name(data, source, number) for number, data in documents]
    _check_names(names, [number for number, _ in documents], source)
    known = {name for name in names if name is not None}
    folder = Path(source).resolve().parent if source != "recipe" else None
    stages = []
    for (number, data), name in zip(documents, names):
        recipe_of = validate_recipe(data, f"{source}, document {number}", text, number - 1)
        references = recipe_of.referenced_models()
        stage = Stage(name, recipe_of, number, frozenset(ref for ref in references if ref in known))
        _check_references(stage, references, known, source, folder)
        stages.append(stage)
    return dependency_order(stages, source)


def _stage_name(data: Any, source: str, number: int) -> str | None:
    name = data.get("name") if isinstance(data, Mapping) else None
    if name is not None and not (isinstance(name, str) and STAGE_NAME.fullmatch(name)):
        raise RecipeError(f"{source}, document {number}: stage name {name!r} becomes a folder name; "
                          "use letters, digits, '.', '_' and '-'")
    return name


def _check_names(names: list[str | None], numbers: list[int], source: str) -> None:
    seen: dict[str | None, int] = {}
    for name, number in zip(names, numbers):
        if name in seen:
            if name is None:
                raise RecipeError(f"{source}: documents {seen[name]} and {number} both have no 'name'; exactly one document "
                                  "(the final merge, written to the output folder) may be unnamed")
            raise RecipeError(f"{source}: documents {seen[name]} and {number} are both named '{name}'; stage names must be unique")
        seen[name] = number
    if None not in seen:
        raise RecipeError(f"{source}: every document has a 'name', so none is the final merge; remove the 'name' of the "
                          "document to write to the output folder")


def _check_references(stage: Stage, references: list[str], known: set[str], source: str, folder: Path | None) -> None:
    """A reference that is neither a stage nor an existing path but is close to a stage name is
    a typo of that name (a model id that exists is never flagged)."""
    for ref in references:
        if ref in known or Path(ref).expanduser().exists() or (folder is not None and (folder / ref).exists()):
            continue
        match = closest(ref, known)
        if match is not None:
            raise RecipeError(f"{source}: {stage.label} reads model '{ref}', which is neither a stage nor a folder; "
                              f"did you mean stage '{match}'?")


def dependency_order(stages: list[Stage], source: str) -> list[Stage]:
    """The stages in an order where each comes after those it reads (file order where free);
    a cycle is an error naming its documents."""
    by_name = {stage.name: stage for stage in stages if stage.name is not None}
    ordered: list[Stage] = []
    done: set[int] = set()

    def visit(stage: Stage, path: list[Stage]) -> None:
        if stage.document in done:
            return
        if stage in path:
            cycle = path[path.index(stage):] + [stage]
            raise RecipeError(f"{source}: the stages read each other in a cycle: {' -> '.join(s.label for s in cycle)}")
        for name in sorted(stage.needs, key=lambda n: by_name[n].document):
            visit(by_name[name], [*path, stage])
        done.add(stage.document)
        ordered.append(stage)

    for stage in stages:
        visit(stage, [])
    return ordered


def needed_stages(stages: list[Stage]) -> set[str]:
    """The names of the stages the final merge reads, directly or through other stages."""
    by_name = {stage.name: stage for stage in stages if stage.name is not None}
    final = next(stage for stage in stages if stage.name is None)
    needed: set[str] = set()
    pending = list(final.needs)
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(by_name[name].needs)
    return needed


def merge_stages(stages: list[Stage], out_dir: Any, options: MergeOptions, relative_to: Path | None) -> MergeResult:
    """Run every stage the final merge needs (every stage, with ``options.intermediate_dir``),
    in order; the result is the final merge's, with the others' in ``stages``."""
    from mergeforge.engine.api import merge_recipe

    keep = options.intermediate_dir is not None
    needed = needed_stages(stages)
    # The final merge last (its inputs come before it in any case), so nothing runs after the output appears.
    run = [stage for stage in stages if stage.name is not None and (keep or stage.name in needed)]
    run += [stage for stage in stages if stage.name is None]
    for stage in stages:
        if stage not in run:
            log.warning(f"{stage.label} is not read by the final merge; skipped (pass --intermediate-dir to merge and keep it)")
    if options.dry_run:
        return _dry_run(run, out_dir, options, relative_to)
    if out_dir is None:
        raise OutputError("an output folder is required unless dry_run is set")
    out_path = Path(out_dir)
    # Refuse a bad output folder now, not after the stages have run.
    folder_files.check_output_location(out_path, [], options.overwrite)
    started = time.perf_counter()
    root = _intermediate_root(options, out_path)
    if keep:
        for stage in run:
            if stage.name is not None:
                folder_files.check_output_location(root / stage.name, [], options.overwrite)
    # Intermediate stages are Hugging Face folders whatever the final output's format.
    stage_options = dataclasses.replace(options, intermediate_dir=None, out_format="hf", out_type=None)
    results: list[MergeResult] = []
    try:
        folders: dict[str, Path] = {}
        for position, stage in enumerate(run, 1):
            announce(f"stage {position}/{len(run)}: {stage.label}", not options.quiet)
            needs = {name: folders[name] for name in stage.needs}
            if stage.name is None:
                final = merge_recipe(stage.recipe, out_path, options, relative_to, needs)
            else:
                folders[stage.name] = root / stage.name
                results.append(merge_recipe(stage.recipe, folders[stage.name], stage_options, relative_to, needs))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    final.stages = results
    final.warnings = [w for r in results for w in r.warnings] + final.warnings
    final.seconds = time.perf_counter() - started
    return final


def _intermediate_root(options: MergeOptions, out_path: Path) -> Path:
    """``--intermediate-dir`` (created), else a new temporary folder beside the output, on the
    same disk, since stages are model-sized."""
    if options.intermediate_dir is None:
        parent = out_path.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_path.name}.stages-", dir=parent))
    root = Path(options.intermediate_dir)
    if root.resolve() == out_path.resolve() or out_path.resolve() in root.resolve().parents:
        raise OutputError(f"--intermediate-dir {root}: is, or is inside, the output folder {out_path}; choose another")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _dry_run(run: list[Stage], out_dir: Any, options: MergeOptions, relative_to: Path | None) -> MergeResult:
    """The stage order, and the plan of every stage whose inputs exist already: a stage that
    reads another's output can only be planned once that output is on disk."""
    from mergeforge.engine.api import merge_recipe

    lines = [f"stages: {' -> '.join(stage.label for stage in run)}"]
    final: MergeResult | None = None
    earlier: list[MergeResult] = []
    for stage in run:
        target = "the output folder" if stage.name is None else (
            f"{Path(options.intermediate_dir) / stage.name}" if options.intermediate_dir is not None else "a temporary folder")
        lines.append(f"== {stage.label} -> {target}")
        if stage.needs:
            lines.append(f"  reads {', '.join(sorted(stage.needs))}: planned when they are merged")
            continue
        result = merge_recipe(stage.recipe, out_dir if stage.name is None else None, options, relative_to)
        lines += ["  " + line for line in result.plan_lines]
        if stage.name is None:
            final = result
        else:
            earlier.append(result)
    summary = final or MergeResult(out_dir=None if out_dir is None else Path(out_dir), method=run[-1].recipe.merge_method,
                                   executor="", tensors=0, bytes_read=0, bytes_written=0, estimated_peak_bytes=0)
    summary.plan_lines = lines
    summary.stages = earlier
    return summary
