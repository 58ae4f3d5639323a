"""The layer-path genome of Sakana's data-flow search (Akiba et al., arXiv:2403.13187, section 3.2):
which (model, layer) steps a candidate routes the hidden states through, in which order, and with
which scale, and the plain ``passthrough`` recipe that builds the same model.

**Slots.** All the layers of the path's models in order (every layer of the first model, then of
the second, ...), the whole repeated ``repeats`` times: T = r · Σ layers slots. A path takes a
subset of the slots and keeps their order, so the same layer can appear up to r times and the
models' layers interleave in any pattern the slot order allows.

**Genes.** T indicator genes, then T scale genes (none with ``search_scales: false``: every
scale is then 1). CMA-ES is continuous, so an indicator is a
number in [0, 1] and its slot is taken when it is above 0.5; a scale gene maps the unit interval
onto the scale bounds and matters only when its slot is taken. With ``max_steps`` a path keeps its
first ``max_steps`` taken slots.

**Scale.** A step's scale s multiplies its layer's two residual updates:
``h ← h + s·attn(norm(h))``, then ``h ← h + s·mlp(norm(h))``. Both updates end in a linear map
(``o_proj``, ``down_proj``), so s folds exactly into those weights (and biases). Sakana puts a
scale on each hop between layers; a hop's scale on the update of the layer it leaves is the same
thing, one per step.

**Export.** One ``passthrough`` slice per run of consecutive layers of one model that share a
scale (in practice one per step once scales are searched), the scale as a filter list on
``o_proj`` and ``down_proj``. The engine (and mergekit) take the embeddings from the first slice's
model and the final norm and head from the last one's, and so does the routed model. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mergeforge.errors import RecipeError
from mergeforge.evolve.config import SearchConfig

# A slot is taken when its indicator gene is above this (the genome lives in the unit cube).
THRESHOLD = 0.5
# Where the start's indicators sit: one sigma0 (1/6) and a half from the threshold, so a step of
# the first generations flips a few slots, not none and not all.
START_ON, START_OFF = 0.75, 0.25


@dataclass(frozen=True)
class Step:
    """One step of a path: layer ``layer`` of model ``model`` with ``scale`` on its updates."""

    model: int
    layer: int
    scale: float


class PathSpace:
    """Slots, genes and the genome -> path -> recipe mappings of one layer-path search."""

    def __init__(self, config: SearchConfig, layer_counts: Sequence[int], model_names: Sequence[str]):
        assert config.layer_path is not None
        self.config, self.path = config, config.layer_path
        self.layer_counts, self.model_names = list(layer_counts), list(model_names)
        once = [(model, layer) for model, count in enumerate(self.layer_counts) for layer in range(count)]
        self.slots = once * self.path.repeats
        if not self.slots:
            raise RecipeError("field 'layer_path.models': the models have no decoder layers")
        if self.path.max_steps is not None and self.path.max_steps > len(self.slots):
            raise RecipeError(f"field 'layer_path.max_steps': {self.path.max_steps} is more than the {len(self.slots)} slots "
                              f"({self.path.repeats} repeats of {len(once)} layers); use at most {len(self.slots)}")
        self.labels = [f"{len(self.slots)} slots ({self.path.repeats} × {len(once)} layers)"]

    @property
    def dimensions(self) -> int:
        return (2 if self.path.search_scales else 1) * len(self.slots)

    def start(self) -> list[float]:
        """The start model's layers in order (its slots of the first repeat on), every scale at its start."""
        bounds = self.path.scale
        scale = 0.5 if bounds.start is None else (bounds.start - bounds.low) / (bounds.high - bounds.low)
        first_repeat = len(self.slots) // self.path.repeats
        on = [START_ON if slot < first_repeat and model == self.path.start else START_OFF
              for slot, (model, _) in enumerate(self.slots)]
        return on + [scale] * (self.dimensions - len(self.slots))

    def values(self, unit: Sequence[float]) -> list[float]:
        """The genome clipped to the cube, scales mapped onto their bounds (indicators stay in [0, 1])."""
        if len(unit) != self.dimensions:
            raise RecipeError(f"a genome of {len(unit)} numbers for a layer-path search of {self.dimensions} genes")
        clipped = [min(1.0, max(0.0, float(x))) for x in unit]
        bounds = self.path.scale
        half = len(self.slots)
        if not self.path.search_scales:
            return clipped + [1.0] * half
        return clipped[:half] + [bounds.low + x * (bounds.high - bounds.low) for x in clipped[half:]]

    def steps(self, values: Sequence[float]) -> list[Step]:
        """The path: the taken slots in slot order (the first ``max_steps`` of them)."""
        half = len(self.slots)
        steps = [Step(model, layer, values[half + slot]) for slot, (model, layer) in enumerate(self.slots)
                 if values[slot] > THRESHOLD]
        return steps if self.path.max_steps is None else steps[: self.path.max_steps]

    def described(self, values: Sequence[float]) -> dict[str, Any]:
        """The path for the journal and the report: one ``model.layer×scale`` string per step."""
        return {"steps": [f"{self.model_names[s.model]}.{s.layer}×{s.scale:.4f}" for s in self.steps(values)]}

    def recipe(self, values: Sequence[float], model_refs: Sequence[str]) -> dict[str, Any]:
        """The path as a plain mergekit ``passthrough`` recipe with the scales folded in."""
        steps = self.steps(values)
        if not steps:
            raise RecipeError("the path takes no layer; a passthrough recipe needs one slice at least")
        runs: list[list[Step]] = []
        for step in steps:
            last = runs[-1][-1] if runs else None
            if last is not None and (last.model, last.layer + 1, last.scale) == (step.model, step.layer, step.scale):
                runs[-1].append(step)
            else:
                runs.append([step])
        slices = []
        for run in runs:
            source: dict[str, Any] = {"model": model_refs[run[0].model], "layer_range": [run[0].layer, run[-1].layer + 1]}
            if run[0].scale != 1.0:
                source["parameters"] = {"scale": [{"filter": "o_proj", "value": run[0].scale},
                                                  {"filter": "down_proj", "value": run[0].scale}, {"value": 1.0}]}
            slices.append({"sources": [source]})
        # float32: the precision the candidates were evaluated in, so the fold reproduces them exactly.
        return {"merge_method": "passthrough", "dtype": "float32", "slices": slices}
