"""``mergeforge lora merge``: merge LoRA adapters of one base with any catalogue method, exactly, in
delta space.

PEFT's ``add_weighted_adapter`` (``linear``, ``ties``, ``dare_*``) combines the A factors and the B
factors separately, which is not a merge of the updates: Σ√wᵢBᵢ · Σ√wᵢAᵢ ≠ Σ wᵢBᵢAᵢ (PEFT #3004).
Here every method runs on the updates themselves, ΔWᵢ = scaleᵢ·BᵢAᵢ (per-module ``rank_pattern``,
``alpha_pattern`` and rsLoRA honoured), with a zero base, through the same
:func:`~mergeforge.engine.api.merge_tensors` as any other merge. The merged update goes back into
factors three ways:

- **concat**: methods linear in ΔW (``linear``; ``task_arithmetic`` without sparsification) have
  coefficients cᵢ (read off the method itself, on unit vectors), and Σ cᵢΔWᵢ = [c₁s₁B₁ … cₙsₙBₙ]·[A₁; …; Aₙ]
  exactly; with a rank or energy target it is truncated optimally by QR of the stacked factors and
  an SVD of the small core (:func:`~mergeforge.lora.factors.refactor`), never a dense SVD;
- **dense-svd**: any other method (TIES, DARE, TSV, ...) yields a dense ΔW, truncated by SVD to
  the target (default: the sum of the input ranks), with the discarded energy reported;
- **knots** (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025): one SVD of the
  concatenated updates [ΔW₁ … ΔWₙ] = U S [V₁ᵀ … Vₙᵀ] puts them in a shared basis; the method
  merges the aligned coefficients Vᵢᵀ, and ΔW = U S V_mergedᵀ. The SVD comes from the factors
  (QR of each side, one small core), so no [out, n·in] matrix is formed.

DoRA adapters are refused (their magnitude vector is not a low-rank update), so are adapters of
different bases, and methods that need calibration data or write side outputs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeforge.checkpoint.folder import atomic_output_folder, check_output_location
from mergeforge.engine.api import merge_tensors
from mergeforge.engine.recipe import Parameters, load_recipe, parse_yaml
from mergeforge.engine.rules import count_layers, first_value, job_seed, layer_index
from mergeforge.errors import CheckpointError, RecipeError
from mergeforge.lora.adapter import Adapter, ModuleUpdate, read_lora, write_lora
from mergeforge.lora.factors import Factors, RankRule, refactor, truncated_svd
from mergeforge.methods.registry import MethodSpec, get_method

REPORT_FILE = "merge_report.json"
# The adapter-merge fields a recipe may carry beside mergekit's (the CLI's flags override them).
LORA_FIELDS = ("rank", "energy", "sv_epsilon", "knots")
# Recipe fields that have no meaning for adapters; refused rather than ignored.
UNUSED_FIELDS = ("slices", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "calibration")


@dataclass(frozen=True)
class AdapterRecipe:
    """A merge of adapters: mergekit's ``merge_method``/``models``/``parameters``, where each model
    is a PEFT adapter folder, plus the output's rank rule."""

    method: str
    adapters: list[Path]
    model_parameters: list[Parameters | None]
    parameters: Parameters | None = None
    base_model: str | None = None
    rank: int | None = None
    energy: float | None = None
    sv_epsilon: float = 0.0
    knots: bool = False
    source: str = "recipe"

    def rule(self) -> RankRule | None:
        """None keeps a linear merge exact; a rule truncates every module."""
        if self.rank is None and self.energy is None:
            return None
        return RankRule(max_rank=self.rank, energy=self.energy, sv_epsilon=self.sv_epsilon)


def load_adapter_recipe(recipe: Mapping[str, Any] | str | os.PathLike[str], **overrides: Any) -> AdapterRecipe:
    """Read an adapter-merge recipe (a YAML file, YAML text or a dict); ``overrides`` (rank, energy,
    sv_epsilon, knots) replace its fields when not None. Adapter paths are relative to the file."""
    source, relative_to = "recipe", Path.cwd()
    data: Any = recipe
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        if "\n" not in str(recipe) and (path.suffix in (".yml", ".yaml") or path.exists()):
            if not path.is_file():
                raise RecipeError(f"{path}: recipe file not found")
            source, relative_to = str(path), path.resolve().parent
            data = parse_yaml(path.read_text(encoding="utf-8"), source)
        else:
            data = parse_yaml(str(recipe), source)
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: an adapter-merge recipe is a mapping with 'merge_method' and 'models'")
    data = dict(data)
    extra = {key: data.pop(key) for key in LORA_FIELDS if key in data}
    for key in UNUSED_FIELDS:
        if data.get(key) is not None:
            raise RecipeError(f"{source}: field '{key}' has no meaning for an adapter merge; remove it")
    parsed = load_recipe(data)
    if parsed.models is None:
        raise RecipeError(f"{source}: list the adapters under 'models'")
    extra.update({key: value for key, value in overrides.items() if value is not None})
    unknown = sorted(set(extra) - set(LORA_FIELDS))
    if unknown:
        raise RecipeError(f"{source}: unknown option '{unknown[0]}'")
    adapters = [_adapter_path(entry.model, relative_to) for entry in parsed.models]
    return AdapterRecipe(parsed.merge_method, adapters, [entry.parameters for entry in parsed.models], parsed.parameters,
                         parsed.base_model, extra.get("rank"), extra.get("energy"), float(extra.get("sv_epsilon") or 0.0),
                         bool(extra.get("knots", False)), source)


def _adapter_path(ref: str, relative_to: Path) -> Path:
    path = Path(ref).expanduser()
    return path if path.is_absolute() or not (relative_to / path).exists() else relative_to / path


@dataclass
class ModuleMergeReport:
    module: str
    path: str  # concat | qr-svd | dense-svd | knots
    rank: int
    discarded_energy: float  # share of the merged ||ΔW||_F² not kept by the output's factors


@dataclass
class AdapterMergeResult:
    out_dir: Path | None
    method: str
    modules: list[ModuleMergeReport]
    seconds: float = 0.0
    updates: list[ModuleUpdate] = field(default_factory=list, repr=False)

    @property
    def max_discarded(self) -> float:
        return max((m.discarded_energy for m in self.modules), default=0.0)

    def summary_lines(self) -> list[str]:
        paths: dict[str, int] = {}
        for module in self.modules:
            paths[module.path] = paths.get(module.path, 0) + 1
        ranks = [m.rank for m in self.modules]
        worst = max(self.modules, key=lambda m: m.discarded_energy)
        return [f"{self.method}: {len(self.modules)} modules ({', '.join(f'{n} {p}' for p, n in sorted(paths.items()))}), "
                f"ranks {min(ranks)}-{max(ranks)}",
                f"discarded energy max {worst.discarded_energy:.2e} ({worst.module})",
                *([f"wrote {self.out_dir} (report: {REPORT_FILE})"] if self.out_dir else [])]


def check_method(spec: MethodSpec, count: int, source: str) -> None:
    """Refuse methods that cannot run on updates alone."""
    if spec.calibrate is not None:
        raise RecipeError(f"{source}: merge_method '{spec.name}' needs calibration data and whole models; "
                          "it cannot merge adapters")
    if spec.extra_outputs is not None:
        raise RecipeError(f"{source}: merge_method '{spec.name}' writes per-task side outputs, which an adapter cannot hold")
    spec.check_model_count(count, source)


def check_same_base(adapters: Sequence[Adapter], base_model: str | None) -> str:
    """The base all adapters share (as written in the first one's config); an error otherwise."""
    identities = {adapter.folder: adapter.base_identity() for adapter in adapters}
    first = adapters[0]
    for adapter in adapters[1:]:
        if identities[adapter.folder] != identities[first.folder]:
            raise CheckpointError(f"{adapter.folder}: adapter of base '{adapter.base_name}', but {first.folder} is of base "
                                  f"'{first.base_name}'; only adapters of one base can be merged")
    return base_model or first.base_name


def _module_shapes(adapters: Sequence[Adapter]) -> dict[str, tuple[tuple[int, int], bool]]:
    """Each adapted module's weight shape and kind, checked to agree across adapters."""
    seen: dict[str, tuple[tuple[int, int], bool, Path]] = {}
    for adapter in adapters:
        if adapter.saved:
            name = sorted(adapter.saved)[0]
            raise CheckpointError(f"{adapter.folder}: tensor '{name}' is a modules_to_save copy, not a low-rank update; "
                                  "merging saved modules is not supported, extract without it (--skip-undecomposable)")
        for name, update in adapter.updates.items():
            if name in seen and seen[name][:2] != (update.shape, update.embedding):
                raise CheckpointError(f"module '{name}': {update.shape} in {adapter.folder} but {seen[name][0]} in {seen[name][2]}; "
                                      "adapters of different bases?")
            seen.setdefault(name, (update.shape, update.embedding, adapter.folder))
    return {name: (shape, embedding) for name, (shape, embedding, _) in sorted(seen.items())}


def module_parameters(spec: MethodSpec, tensor: str, t: float, model_parameters: Sequence[Parameters | None],
                      parameters: Parameters | None, source: str) -> dict[str, Any]:
    """The method's parameters for one tensor: per-model ones as lists (a model's own value, else
    the top level's), global ones from the top level; gradients and filters resolved as in a merge."""
    names = set(parameters or {}).union(*(set(p or {}) for p in model_parameters))
    resolved: dict[str, Any] = {}
    for name in sorted(names):
        param = spec.param(name)
        if param is None:
            known = ", ".join(p.name for p in spec.params) or "none"
            raise RecipeError(f"{source}: merge_method '{spec.name}' has no parameter '{name}' (it takes: {known})")
        if param.per_model:
            resolved[name] = [first_value(name, [own, parameters], tensor, t) for own in model_parameters]
        elif any(own and name in own for own in model_parameters):
            raise RecipeError(f"{source}: parameter '{name}' of '{spec.name}' is global; set it under the top-level 'parameters'")
        else:
            resolved[name] = first_value(name, [parameters], tensor, t)
    return resolved


def linear_coefficients(spec: MethodSpec, count: int, params: Mapping[str, Any]) -> torch.Tensor | None:
    """cᵢ with merge(ΔW₁…ΔWₙ) = Σ cᵢΔWᵢ when the method is linear in the updates with these
    parameters, else None. The coefficients come from the method itself, run on unit vectors, so a
    weighting rule (normalize, lambda) is never written twice."""
    if spec.name == "task_arithmetic":
        densities = params.get("density") or [None]
        if any(d is not None and d < 1 for d in densities):
            return None  # sparsified: not linear
    elif spec.name != "linear":
        return None
    units = list(torch.eye(count))
    return merge_tensors(spec.name, units, base=torch.zeros(count), **params)


def _zero(shape: tuple[int, int], embedding: bool) -> ModuleUpdate:
    rows, cols = (shape[1], shape[0]) if embedding else shape
    return ModuleUpdate("", torch.zeros(rows, 0), torch.zeros(0, cols), 1.0, embedding)


def _stack(members: Sequence[ModuleUpdate], coefficients: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    up = torch.cat([m.up.double() * (m.scale * c) for m, c in zip(members, coefficients)], dim=1)
    down = torch.cat([m.down.double() for m in members], dim=0)
    return up, down


def knots_basis(members: Sequence[ModuleUpdate]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """KnOTS's shared basis: [ΔW₁ … ΔWₙ] = U diag(s) [V₁ᵀ … Vₙᵀ], from the factors. Returns U, s and
    each update's aligned coefficients Vᵢᵀ ([k, in]), zero for a member without this module."""
    present = [m for m in members if m.rank > 0]
    up = torch.cat([m.up.double() * m.scale for m in present], dim=1)
    q_up, r_up = torch.linalg.qr(up)
    sides = [torch.linalg.qr(m.down.double().T) for m in present]  # Aᵢᵀ = Qᵢ Rᵢ
    core = r_up @ torch.block_diag(*[r.T for _, r in sides])
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    coefficients: list[torch.Tensor] = []
    start, blocks = 0, iter(sides)
    for member in members:
        if member.rank == 0:
            coefficients.append(torch.zeros(len(s), member.down.shape[1], dtype=torch.float64))
            continue
        q, _ = next(blocks)
        coefficients.append(vh_core[:, start:start + member.rank] @ q.T)
        start += member.rank
    return q_up @ u_core, s, coefficients


def merge_module(spec: MethodSpec, members: Sequence[ModuleUpdate], params: Mapping[str, Any], rule: RankRule | None,
                 knots: bool, seed: int) -> tuple[Factors, str]:
    """The merged update of one module as factors, and which path made them."""
    total_rank = sum(m.rank for m in members)
    rows, cols = members[0].up.shape[0], members[0].down.shape[1]
    if knots:
        u, s, aligned = knots_basis(members)
        merged = merge_tensors(spec.name, [a.float() for a in aligned], base=torch.zeros(aligned[0].shape), seed=seed, **params)
        return refactor(u * s, merged.double(), rule or _lossless(len(s), rows, cols)), "knots"
    coefficients = linear_coefficients(spec, len(members), params)
    if coefficients is not None:
        up, down = _stack(members, coefficients.tolist())
        chosen = rule or _lossless(total_rank, rows, cols)
        return refactor(up, down, chosen), "concat" if chosen is None else "qr-svd"
    deltas = [(m.up.float() * m.scale) @ m.down.float() for m in members]
    merged = merge_tensors(spec.name, deltas, base=torch.zeros(rows, cols), seed=seed, **params)
    return truncated_svd(merged, rule or RankRule(max_rank=max(total_rank, 1))), "dense-svd"


def _lossless(rank: int, rows: int, cols: int) -> RankRule | None:
    """A concatenation wider than the weight is re-factored to the weight's rank, losing nothing."""
    return RankRule(max_rank=min(rows, cols)) if rank > min(rows, cols) else None


def merge_lora_updates(adapters: Sequence[Adapter], recipe: AdapterRecipe, seed: int = 0,
                       progress: Callable[[str], None] | None = None) -> AdapterMergeResult:
    """Merge read adapters in memory (see :func:`merge_adapters`); the result holds the updates."""
    spec = get_method(recipe.method)
    check_method(spec, len(adapters), recipe.source)
    shapes = _module_shapes(adapters)
    layers = count_layers(list(shapes))
    rule = recipe.rule()
    updates, reports = [], []
    for module, (shape, embedding) in shapes.items():
        tensor = f"{module}.weight"
        index = layer_index(tensor)
        t = 0.0 if index is None or layers <= 1 else index / (layers - 1)
        params = module_parameters(spec, tensor, t, recipe.model_parameters, recipe.parameters, recipe.source)
        members = [adapter.updates.get(module) or _zero(shape, embedding) for adapter in adapters]
        factors, path = merge_module(spec, members, params, rule, recipe.knots, job_seed(seed, tensor))
        updates.append(ModuleUpdate(module, factors.up, factors.down, 1.0, embedding))
        reports.append(ModuleMergeReport(module, path, factors.rank, max(0.0, 1.0 - factors.kept_energy)))
        if progress is not None:
            progress(f"{module}: {path}, rank {factors.rank}")
    return AdapterMergeResult(None, spec.name, reports, updates=updates)


def merge_adapters(recipe: AdapterRecipe | Mapping[str, Any] | str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                   seed: int = 0, overwrite: bool = False, progress: Callable[[str], None] | None = None,
                   **overrides: Any) -> AdapterMergeResult:
    """Merge PEFT LoRA adapters of one base into a new adapter folder, exactly in delta space.

    Arguments:
        recipe: an :class:`AdapterRecipe`, or a YAML file, YAML text or dict: ``merge_method``,
            ``models`` (adapter folders, with per-model ``parameters``), ``parameters``, and
            optionally ``base_model``, ``rank``, ``energy``, ``sv_epsilon`` and ``knots``.
        out_dir: the adapter folder to write (atomically).
        seed: seed of random methods (DARE, DELLA), per module as in a merge.
        overwrite: replace a non-empty ``out_dir``.
        overrides: ``rank``, ``energy``, ``sv_epsilon``, ``knots`` replacing the recipe's.

    Returns:
        An :class:`AdapterMergeResult`: per module, the path taken, the rank and the discarded energy.

    Example:
        >>> merge_adapters({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}},
        ...                 {"model": "b", "parameters": {"weight": 1}}], "parameters": {"density": 0.5}},
        ...                "merged-adapter/", rank=16)
    """
    started = time.perf_counter()
    if not isinstance(recipe, AdapterRecipe):
        recipe = load_adapter_recipe(recipe, **overrides)
    elif overrides:
        raise RecipeError("merge_adapters: pass rank, energy and knots inside an AdapterRecipe, or give a recipe to override")
    out_path = Path(out_dir)
    check_output_location(out_path, recipe.adapters, overwrite)
    adapters = [read_lora(folder) for folder in recipe.adapters]
    base_model = check_same_base(adapters, recipe.base_model)
    result = merge_lora_updates(adapters, recipe, seed, progress)
    result.out_dir = out_path
    with atomic_output_folder(out_path) as temp:
        write_lora(temp, result.updates, base_model)
        result.seconds = time.perf_counter() - started
        report = {"method": result.method, "adapters": [str(a) for a in recipe.adapters], "knots": recipe.knots,
                  "rank": recipe.rank, "energy": recipe.energy, "max_discarded_energy": result.max_discarded,
                  "modules": [asdict(m) for m in result.modules]}
        (temp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return result
