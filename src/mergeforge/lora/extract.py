"""``mergeforge lora extract``: a PEFT LoRA adapter from the difference between a fine-tune and its
base (mergekit-extract-lora's job, with its option names).

Every module whose weights changed ends up in the adapter, one way or another:

- a linear layer's weight delta is decomposed by truncated SVD into ``lora_A``/``lora_B``, with the
  rank from an energy target or a cap (:class:`~mergeforge.lora.factors.RankRule`);
- an embedding's delta becomes ``lora_embedding_A``/``_B`` with ``embed_lora``, else the module is
  saved whole (``modules_to_save``), and so is one whose vocabulary grew (added tokens: the new
  rows have no base row to be a delta of);
- anything else that changed (norms, biases, 1-D or 3-D tensors) is saved whole, or, with
  ``skip_undecomposable``, left out and listed; it is never dropped silently (mergekit #521).

Identical models are an error (mergekit #447 wrote an empty adapter). Each module's relative
reconstruction error is measured on the stored factors and written to ``extraction_report.json``.
Inputs are read one tensor at a time; only the factors are held.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeforge.checkpoint.folder import (
    TOKENIZER_FILES,
    atomic_output_folder,
    check_output_location,
)
from mergeforge.checkpoint.reader import TensorSource, open_checkpoint
from mergeforge.dtypes import TORCH_NAMES, parse_recipe_dtype, to_torch
from mergeforge.errors import CheckpointError, MergeforgeError
from mergeforge.lora.adapter import ModuleUpdate, write_lora
from mergeforge.lora.factors import RankRule, relative_error, truncated_svd

log = logging.getLogger("mergeforge")

REPORT_FILE = "extraction_report.json"
DEFAULT_MAX_RANK = 128  # mergekit-extract-lora's default


@dataclass(frozen=True)
class ExtractOptions:
    """The options of :func:`extract_lora` (mergekit-extract-lora's names where it has them)."""

    max_rank: int | None = None  # cap per module; DEFAULT_MAX_RANK when no energy target is given
    energy: float | None = None  # share of each delta's squared Frobenius norm to keep, in (0, 1]
    sv_epsilon: float = 0.0  # singular values at or below it are dropped
    randomized: bool = False  # torch.svd_lowrank instead of the full SVD (error measured per module)
    embed_lora: bool = False  # embeddings as lora_embedding_A/B instead of modules_to_save
    save_modules: tuple[str, ...] = ()  # modules saved whole (a module path, or its last part)
    include_regex: str | None = None  # only modules whose path matches are decomposed
    exclude_regex: str | None = None  # modules whose path matches are not decomposed
    skip_undecomposable: bool = False  # leave changed non-matrix modules out (listed) instead of saving them whole
    distribute_scale: bool = True  # √s into both factors (mergekit's default), else all into lora_B
    out_dtype: str | None = None  # dtype of the stored tensors (float32, bfloat16, ...); None: the fine-tune's
    overwrite: bool = False
    seed: int = 0  # seed of the randomized SVD

    def __post_init__(self) -> None:
        if self.out_dtype is not None and self.out_dtype not in TORCH_NAMES:
            object.__setattr__(self, "out_dtype", parse_recipe_dtype(self.out_dtype, "--out-dtype"))
        self.rule()  # a bad --energy or --max-rank is reported before anything is read

    def rule(self) -> RankRule:
        max_rank = self.max_rank if self.max_rank is not None or self.energy is not None else DEFAULT_MAX_RANK
        return RankRule(max_rank=max_rank, energy=self.energy, sv_epsilon=self.sv_epsilon)


@dataclass
class ModuleReport:
    """What happened to one changed module."""

    module: str
    kind: str  # lora | embedding_lora | modules_to_save | skipped | excluded
    shape: list[int]
    rank: int = 0
    relative_error: float = 0.0  # ||ΔW - BA||_F / ||ΔW||_F, measured on the stored factors
    kept_energy: float = 1.0  # share of ||ΔW||_F² in the kept singular values
    note: str = ""


@dataclass
class ExtractResult:
    out_dir: Path
    modules: list[ModuleReport]
    unchanged: int  # modules identical in both models
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max((m.relative_error for m in self.modules if m.kind in ("lora", "embedding_lora")), default=0.0)

    def summary_lines(self) -> list[str]:
        counts: dict[str, int] = {}
        for module in self.modules:
            counts[module.kind] = counts.get(module.kind, 0) + 1
        decomposed = [m for m in self.modules if m.kind in ("lora", "embedding_lora")]
        lines = [f"{len(self.modules)} changed modules ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}), "
                 f"{self.unchanged} unchanged"]
        if decomposed:
            ranks = [m.rank for m in decomposed]
            worst = max(decomposed, key=lambda m: m.relative_error)
            lines.append(f"ranks {min(ranks)}-{max(ranks)}; relative error max {worst.relative_error:.2e} ({worst.module}), "
                         f"mean {sum(m.relative_error for m in decomposed) / len(decomposed):.2e}")
        lines += [f"note: {m.module}: {m.note}" for m in self.modules if m.note]
        lines.append(f"wrote {self.out_dir} (report: {REPORT_FILE})")
        return lines


def module_kinds(folder: Path) -> dict[str, str]:
    """``linear`` or ``embedding`` by module path, from the architecture built on the meta device
    (no memory, no weights); empty when transformers cannot build it (names then decide)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an unknown architecture is not an error: tensor names decide instead
        log.warning("%s: cannot build the architecture to tell linear layers from embeddings (%s); going by tensor names", folder, exc)
        return {}
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
    return kinds


def _guess_kind(module: str, shape: tuple[int, ...]) -> str:
    if len(shape) != 2:
        return "other"
    return "embedding" if re.search(r"(embed|wte|wpe)[^.]*$", module) else "linear"


def _grouped(names: Iterable[str]) -> dict[str, list[str]]:
    """Tensor names by module path (``model.norm.weight`` -> ``model.norm``)."""
    modules: dict[str, list[str]] = {}
    for name in names:
        module, dot, _ = name.rpartition(".")
        modules.setdefault(module if dot else name, []).append(name)
    return modules


def _check_names(model: TensorSource, base: TensorSource) -> None:
    model_names, base_names = set(model.names()), set(base.names())
    for name in sorted(model_names - base_names):
        raise CheckpointError(f"tensor '{name}' is in {model.ref} but not in the base {base.ref}; "
                              "an adapter can only change tensors the base has")
    for name in sorted(base_names - model_names):
        raise CheckpointError(f"tensor '{name}' is in the base {base.ref} but not in {model.ref}; are they the same architecture?")


def _saved_whole(module: str, save_modules: tuple[str, ...]) -> bool:
    return any(module == target or module.endswith("." + target) for target in save_modules)


def _grew_vocabulary(model_shape: tuple[int, ...], base_shape: tuple[int, ...]) -> bool:
    return len(model_shape) == 2 and model_shape[1:] == base_shape[1:] and model_shape[0] > base_shape[0]


def _decomposable(module: str, changed: list[str], kinds: dict[str, str], model: TensorSource) -> str | None:
    """``linear`` or ``embedding`` when only the module's weight matrix changed, so a LoRA can
    carry the change (an unchanged bias, as in Qwen2's q/k/v, stays the base's)."""
    weight = f"{module}.weight"
    if changed != [weight] or len(model.info(weight).shape) != 2:
        return None
    kind = kinds.get(module) or _guess_kind(module, model.info(weight).shape)
    return kind if kind in ("linear", "embedding") else None


def extract_lora(model_ref: str | Path, base_ref: str | Path, out_dir: str | Path, options: ExtractOptions | None = None,
                 progress: Callable[[str], None] | None = None) -> ExtractResult:
    """Extract a PEFT LoRA adapter (``model − base``) into ``out_dir``.

    Arguments:
        model_ref: the fine-tuned model folder.
        base_ref: its base model folder.
        out_dir: the adapter folder to write (atomically: a temporary folder, then a rename).
        options: ranks, energy target and the rest (:class:`ExtractOptions`).
        progress: called with one line per decomposed module.

    Returns:
        An :class:`ExtractResult` with one :class:`ModuleReport` per changed module.

    Example:
        >>> extract_lora("finetuned/", "base/", "adapter/", ExtractOptions(energy=0.9))
    """
    options = options or ExtractOptions()
    rule = options.rule()
    include = re.compile(options.include_regex) if options.include_regex else None
    exclude = re.compile(options.exclude_regex) if options.exclude_regex else None
    started = time.perf_counter()
    out_path = Path(out_dir)
    with open_checkpoint(model_ref) as model, open_checkpoint(base_ref) as base:
        check_output_location(out_path, [model.location, base.location], options.overwrite)
        _check_names(model, base)
        kinds = module_kinds(model.folder)
        updates: list[ModuleUpdate] = []
        saved: dict[str, torch.Tensor] = {}
        reports: list[ModuleReport] = []
        unchanged = 0
        for module, params in sorted(_grouped(model.names()).items()):
            report = _extract_module(module, sorted(params), model, base, kinds, options, rule, include, exclude, updates, saved)
            if report is None:
                unchanged += 1
                continue
            reports.append(report)
            if progress is not None and report.kind in ("lora", "embedding_lora"):
                progress(f"{module}: rank {report.rank}, relative error {report.relative_error:.2e}")
        if not reports:
            raise CheckpointError(f"nothing to extract: every tensor of {model.ref} equals the base {base.ref}'s; no adapter written")
        if not updates and not saved:
            raise CheckpointError(f"nothing to extract from {model.ref}: every changed module was excluded or skipped "
                                  f"({', '.join(r.module for r in reports[:3])}{', ...' if len(reports) > 3 else ''})")
        modules_to_save = sorted({r.module for r in reports if r.kind == "modules_to_save"})
        result = ExtractResult(out_path, reports, unchanged, settings=_settings(options, rule, model.ref, base.ref))
        out_dtype = to_torch(options.out_dtype) if options.out_dtype else None
        with atomic_output_folder(out_path) as temp:
            write_lora(temp, updates, str(base_ref), saved=saved, modules_to_save=modules_to_save, dtype=out_dtype)
            for name in TOKENIZER_FILES:  # the fine-tune's tokenizer: it knows any added tokens
                if (model.folder / name).is_file():
                    shutil.copy2(model.folder / name, temp / name)
            result.seconds = time.perf_counter() - started
            report_data = {"settings": result.settings, "unchanged_modules": unchanged, "max_relative_error": result.max_error,
                           "modules": [asdict(r) for r in reports]}
            (temp / REPORT_FILE).write_text(json.dumps(report_data, indent=2) + "\n", encoding="utf-8")
    return result


def _settings(options: ExtractOptions, rule: RankRule, model: str, base: str) -> dict[str, Any]:
    return {"model": model, "base": base, "max_rank": rule.max_rank, "energy": rule.energy, "sv_epsilon": rule.sv_epsilon,
            "randomized": options.randomized, "embed_lora": options.embed_lora, "distribute_scale": options.distribute_scale,
            "out_dtype": options.out_dtype}


def _extract_module(module: str, params: list[str], model: TensorSource, base: TensorSource, kinds: dict[str, str],
                    options: ExtractOptions, rule: RankRule, include: re.Pattern[str] | None, exclude: re.Pattern[str] | None,
                    updates: list[ModuleUpdate], saved: dict[str, torch.Tensor]) -> ModuleReport | None:
    """Decompose, save or skip one module; None when none of its tensors changed."""
    changed, note = [], ""
    for name in params:
        model_shape, base_shape = model.info(name).shape, base.info(name).shape
        if model_shape != base_shape:
            if not _grew_vocabulary(model_shape, base_shape):
                raise CheckpointError(f"tensor '{name}': shape {list(model_shape)} in {model.ref} but {list(base_shape)} in the base "
                                      f"{base.ref}; a fine-tune must keep its base's shapes")
            note = (f"vocabulary grew from {base_shape[0]} to {model_shape[0]} rows (added tokens): saved whole; "
                    f"resize the base's embeddings first (model.resize_token_embeddings({model_shape[0]}))")
            changed.append(name)
        elif not torch.equal(model.read(name), base.read(name)):
            changed.append(name)
    if not changed:
        return None
    shape = list(model.info(params[0]).shape)
    if module == params[0]:
        raise CheckpointError(f"tensor '{module}' changed but belongs to no module, so PEFT cannot save it; "
                              "an adapter cannot carry it")
    kind = None if note or _saved_whole(module, options.save_modules) else _decomposable(module, changed, kinds, model)
    wanted = (include is None or include.search(module)) and not (exclude is not None and exclude.search(module))
    if kind == "linear" or (kind == "embedding" and options.embed_lora):
        if not wanted:
            return ModuleReport(module, "excluded", shape, note="changed, but excluded by --include-regex/--exclude-regex")
        return _decompose(module, model, base, kind, options, rule, updates)
    if kind is None and not note and not _saved_whole(module, options.save_modules) and options.skip_undecomposable:
        return ModuleReport(module, "skipped", shape, note="changed, not a matrix: left out (--skip-undecomposable)")
    for name in params:
        saved[name] = model.read(name) if options.out_dtype is None else model.read(name).to(to_torch(options.out_dtype))
    return ModuleReport(module, "modules_to_save", shape, note=note)


def _decompose(module: str, model: TensorSource, base: TensorSource, kind: str, options: ExtractOptions, rule: RankRule,
               updates: list[ModuleUpdate]) -> ModuleReport:
    name = f"{module}.weight"
    delta = model.read(name).float() - base.read(name).float()
    dtype = to_torch(options.out_dtype or model.info(name).dtype)
    # PEFT stores an embedding's update transposed: lora_embedding_B [dim, r] @ lora_embedding_A [r, vocab].
    target = delta.T if kind == "embedding" else delta
    factors = truncated_svd(target, rule, randomized=options.randomized, distribute=options.distribute_scale, seed=options.seed)
    up, down = factors.up.to(dtype), factors.down.to(dtype)
    if factors.rank == 0:
        raise MergeforgeError(f"module '{module}': no singular value above --sv-epsilon {rule.sv_epsilon}; lower it")
    error = relative_error(target, up, down)
    updates.append(ModuleUpdate(module, up, down, 1.0, embedding=kind == "embedding"))
    return ModuleReport(module, "embedding_lora" if kind == "embedding" else "lora", list(delta.shape), factors.rank, error,
                        factors.kept_energy)
