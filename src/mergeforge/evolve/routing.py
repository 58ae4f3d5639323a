"""Layer-path candidates routed through decoder layers already in memory (Sakana's data-flow
search): the hot path of a ``layer_path`` search.

Every source model is loaded once. A candidate is a transformers model whose ``model.layers`` is a
``ModuleList`` of the chosen source layers themselves (shared, never copied), with the embeddings
of the first step's model and the final norm and head of the last step's (what a ``passthrough``
merge of the path gives), and ``config.num_hidden_layers`` set to the path's length. Each step
sets, just before its layer runs, the layer's ``layer_idx`` (its place in the path, so the KV
cache of generation keeps one entry per step even when a layer appears twice) and its scale.

The scale multiplies the layer's ``o_proj`` and ``down_proj``: :class:`ScaledLinear` computes
``F.linear(x, s·W, s·b)``, the very product the ``passthrough`` merge writes for the folded
weights, so the routed candidate and the model merged from its exported recipe give the same
logits bit for bit (tested). Rotary embeddings come from the routed model's own rotary module,
built from the sources' (identical) config; the causal mask is built from that config too.

Only Llama-family decoder layers (``self_attn.o_proj``, ``mlp.down_proj``) are routed; the
models must share everything but their depth.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn

from mergeforge.errors import RecipeError
from mergeforge.evolve.candidates import Scored, fitness_of, score_model, task_folders
from mergeforge.evolve.config import SearchConfig, resolve_path
from mergeforge.evolve.path_space import PathSpace, Step
from mergeforge.methods.registry import BaseUse, get_method

# Config fields that may differ between the path's models: the depth and what only names things.
DEPTH_FIELDS = {"num_hidden_layers", "layer_types", "_name_or_path", "transformers_version", "architectures", "dtype",
                "torch_dtype"}
SOURCES_DIR = "sources"


class ScaledLinear(nn.Module):
    """A linear map whose weight and bias are multiplied by ``scale`` (1: the map unchanged)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.linear(x)
        bias = None if self.linear.bias is None else self.linear.bias * self.scale
        return F.linear(x, self.linear.weight * self.scale, bias)


class PathStep(nn.Module):
    """One step of a routed path: a source's decoder layer at place ``index`` with ``scale``."""

    def __init__(self, layer: nn.Module, index: int, scale: float):
        super().__init__()
        self.layer, self.index, self.scale = layer, index, scale
        attention: Any = layer.self_attn
        mlp: Any = layer.mlp
        self._attention, self._scaled = attention, (attention.o_proj, mlp.down_proj)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # The layer may be shared with other steps: its cache slot and scale are this step's.
        self._attention.layer_idx = self.index
        for linear in self._scaled:
            linear.scale = self.scale
        return self.layer(hidden_states, *args, **kwargs)


def prepare_source(model: Any, where: str) -> None:
    """Wrap a source's ``o_proj`` and ``down_proj`` in :class:`ScaledLinear` (once)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        raise RecipeError(f"{where}: a layer path needs a decoder-only model with 'model.layers' and 'lm_head' "
                          f"(Llama family), not {type(model).__name__}")
    for layer in layers:
        attention: Any = getattr(layer, "self_attn", None)
        mlp: Any = getattr(layer, "mlp", None)
        if not isinstance(getattr(attention, "o_proj", None), nn.Linear) or not isinstance(getattr(mlp, "down_proj", None), nn.Linear):
            raise RecipeError(f"{where}: its decoder layers have no 'self_attn.o_proj' and 'mlp.down_proj' linear maps "
                              "to fold a scale into (Llama family only)")
        attention.o_proj = ScaledLinear(attention.o_proj)
        mlp.down_proj = ScaledLinear(mlp.down_proj)


def comparable_config(model: Any) -> dict[str, Any]:
    return {key: value for key, value in model.config.to_dict().items() if key not in DEPTH_FIELDS}


class PathRouter:
    """The sources and one routed model whose layers are set per candidate."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        config = copy.deepcopy(self.sources[0].config)
        config.num_hidden_layers = 0
        model: Any = type(self.sources[0])(config)
        self.model = model.to(next(self.sources[0].parameters()).device).eval()
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def route(self, steps: Sequence[Step]) -> Any:
        """The routed model of ``steps`` (the same object each time, its layers replaced)."""
        if not steps:
            raise RecipeError("the path takes no layer")
        first, last = self.sources[steps[0].model], self.sources[steps[-1].model]
        inner = self.model.model
        inner.layers = nn.ModuleList(PathStep(self.sources[s.model].model.layers[s.layer], i, s.scale)
                                     for i, s in enumerate(steps))
        inner.embed_tokens = first.model.embed_tokens
        inner.norm = last.model.norm
        # Tied embeddings: the merged model's head is its (first slice's) embedding matrix.
        self.model.lm_head = first.lm_head if self.tied else last.lm_head
        self.model.config.num_hidden_layers = len(steps)
        if getattr(self.model.config, "layer_types", None) is not None:
            types = [self.sources[s.model].config.layer_types[s.layer] for s in steps]
            self.model.config.layer_types = types
        return self.model

    def identity(self, index: int) -> list[Step]:
        """Source ``index`` as a path: its layers in order, scale 1."""
        return [Step(index, layer, 1.0) for layer in range(len(self.sources[index].model.layers))]


class PathPool:
    """A layer-path search's sources, routed model and scoring: the counterpart of
    :class:`~mergeforge.evolve.candidates.CandidatePool` for ``layer_path``."""

    def __init__(self, config: SearchConfig, folder: Path, out_dir: Path):
        from mergeforge.bench.runner import BenchSuite, ModelPool

        assert config.layer_path is not None
        self.config = config
        self.task_dirs = task_folders(config, folder)
        self.model_dirs = [source_folder(ref, folder, out_dir, config.seed, f"layer_path.models.{i}")
                           for i, ref in enumerate(config.layer_path.models)]
        self.base_dir = resolve_path(config.base_model, folder) if config.base_model is not None else None
        suite = BenchSuite(base=self.base_dir or self.model_dirs[0], experts={}, tasks=self.task_dirs)
        self.pool = ModelPool(suite, config.splits.test_examples, config.batch_size, config.device,
                               config.splits.search_examples)
        sources = [self.pool.load(path) for path in self.model_dirs]
        reference = comparable_config(sources[0])
        for index, model in enumerate(sources):
            where = f"field 'layer_path.models.{index}' ({self.model_dirs[index]})"
            differ = sorted(key for key in reference.keys() | comparable_config(model).keys()
                            if reference.get(key) != comparable_config(model).get(key))
            if differ:
                raise RecipeError(f"{where}: its config differs from the first model's in {', '.join(differ[:4])}; "
                                  "a path routes between models of one architecture that differ only in depth")
            prepare_source(model, where)
        self.router = PathRouter(sources)
        names = unique_names(self.model_dirs)
        self.space = PathSpace(config, [len(m.model.layers) for m in sources], names)
        self.current: Any = None

    def evaluate(self, values: Sequence[float], generation: int | None = None) -> Scored:
        """Route and score one candidate on the search split (generation ``generation``'s minibatch
        of it if the search has one; the whole split when None)."""
        started = time.perf_counter()
        self.load(values)
        routed_at = time.perf_counter()
        scores = self.score(self.config.splits.search, generation)
        return Scored(scores, fitness_of(self.config, scores), 0, routed_at - started, time.perf_counter() - routed_at)

    def load(self, values: Sequence[float]) -> None:
        self.current = self.router.route(self.space.steps(values))

    def load_source(self, index: int) -> None:
        self.current = self.router.route(self.router.identity(index))

    def load_state(self, state: Any) -> None:
        self.current = self.pool.model_with(state)

    def load_folder(self, folder: Path) -> None:
        self.current = self.pool.load(folder)

    def forget(self) -> None:
        """Nothing is cached between candidates: each one is routed afresh."""

    def score(self, split: str, generation: int | None = None) -> dict[str, float]:
        return score_model(self.config, self.pool, self.current, split, generation)

    def winner_recipe(self, values: Sequence[float]) -> dict[str, Any]:
        return self.space.recipe(values, [str(path) for path in self.model_dirs])

    @property
    def base_state(self) -> Any:
        return None if self.base_dir is None else self.pool.state(self.base_dir)

    @property
    def model_states(self) -> list[Any]:
        return [self.pool.state(path) for path in self.model_dirs]

    def full_merge(self, method: str, parameters: Any, model_parameters: Any) -> dict[str, torch.Tensor]:
        """A whole-model merge of the path's models (a baseline of the test table)."""
        from mergeforge.engine.api import merge_state_dicts

        base = self.base_state if get_method(method).base != BaseUse.NONE else None
        return merge_state_dicts(method, self.model_states, base, parameters=parameters, model_parameters=model_parameters,
                                 seed=self.config.seed, device=self.config.device, threads=2)


def source_folder(ref: str, folder: Path, out_dir: Path, seed: int, field: str) -> Path:
    """A path model: a model folder, or a recipe file merged once (by the engine, with the search's
    seed) into ``OUT_DIR/sources/<name>``, which the exported passthrough recipe then names."""
    path = resolve_path(ref, folder)
    if path.is_dir():
        return path
    if not path.is_file():
        raise RecipeError(f"field '{field}': {path} is neither a model folder nor a recipe file")
    if path.suffix not in (".yml", ".yaml"):
        raise RecipeError(f"field '{field}': {path} is a file but not a recipe (.yml or .yaml)")
    from mergeforge.engine.api import merge
    from mergeforge.engine.options import MergeOptions

    merged = out_dir / SOURCES_DIR / path.stem
    if not merged.is_dir():  # the engine writes a temporary folder and renames it: present means complete
        merge(path, merged, MergeOptions(seed=seed, quiet=True))
    return merged


def unique_names(folders: Sequence[Path]) -> list[str]:
    """Short names of the path's models for the journal: folder names, numbered when they repeat."""
    names = [folder.name for folder in folders]
    return [name if names.count(name) == 1 else f"{name}#{i}" for i, name in enumerate(names)]
