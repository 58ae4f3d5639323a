"""The MoE recipe: mergekit-moe's YAML schema, read unchanged, and its checks.

A recipe names a dense ``base_model`` (attention, norms and embeddings come from it), the
``experts`` whose MLPs become the MoE's experts, how the router is initialised (``gate_mode``),
``experts_per_token`` (top-k), an optional ``dtype`` and output ``architecture``, and for
Qwen2-MoE the ``shared_experts``. Field meanings follow mergekit-moe (``mergekit/moe/config.py``):

- ``hidden`` (alias ``hidden_last``): each router row is the base's hidden state at the input of
  the layer (before attention and its norm), at each prompt's last token, averaged over the
  expert's ``positive_prompts``, minus the same over its ``negative_prompts``, scaled to unit norm;
- ``hidden_avg``: the same, averaged over every token of each prompt;
- ``cheap_embed``: the normalised sum of the prompts' token embeddings, the same at every layer;
- ``random``: standard normal rows; ``uniform_random``: torch.nn.Linear's initialisation;
- ``calibrated`` (mergeforge's): fitted on the MoE's own router inputs (:mod:`mergeforge.moe.router`).

mergeforge's other extensions: each expert's ``held_out_prompts`` (routed in the routing report,
never fitted on), and ``shared_method`` / ``shared_parameters``: the tensors outside the MLPs
(attention, norms, embeddings, head) merged from the experts with any method of the catalogue,
the base as its base, instead of taken from the base.

Torch-free; errors name the file and field.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergeforge.config_file import load_config_file
from mergeforge.errors import RecipeError
from mergeforge.moe import ALLOW_ALL_SAME_FLAG

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random", "calibrated")
GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random", "calibrated"]
PROMPT_GATES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "calibrated")


class MoEExpert(BaseModel):
    """One expert: the model whose MLP weights it takes, and the prompts that should reach it."""

    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = Field(default=None, ge=0)  # Gaussian noise added to the expert's weights
    residual_scale: float | None = None  # multiplies the expert's down projection (its residual contribution)
    held_out_prompts: list[str] | None = None  # mergeforge's: routed in the routing report, never fitted on


class MoEConfig(BaseModel):
    """A mergekit-moe recipe."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[MoEExpert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: str | None = None
    experts_per_token: int = Field(default=2, ge=1)
    shared_experts: list[MoEExpert] | None = None
    architecture: str | None = None
    shared_method: str | None = None  # mergeforge's: merge the non-MLP tensors from the experts with this method
    shared_parameters: dict[str, Any] | None = None  # its parameters, as a recipe's top-level ``parameters:``

    @property
    def all_models(self) -> list[str]:
        """The base, then every expert's and shared expert's model, each once."""
        refs = [self.base_model] + [e.source_model for e in self.experts] + [e.source_model for e in self.shared_experts or []]
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)


def _gate_mode_message(error: ValidationError, source: str) -> str | None:
    first = error.errors()[0]
    if first["type"] == "literal_error" and first["loc"][-1] == "gate_mode":
        return f"{source}: field 'gate_mode': unknown gate mode {first['input']!r}; use one of {', '.join(GATE_MODES)}"
    return None


def load_moe_config(config: MoEConfig | dict[str, Any] | str | os.PathLike[str], allow_all_same: bool = False) -> MoEConfig:
    """Validate an MoE recipe given as an object, a dict or a YAML file, and check that it can
    make a useful MoE (see :func:`check_config`)."""
    if isinstance(config, MoEConfig):
        check_config(config, "moe config", allow_all_same)
        return config
    parsed, source, _ = load_config_file(config, MoEConfig, what="MoE config file", source="moe config",
                                         mapping="an MoE config must be a mapping with 'base_model' and 'experts'",
                                         schemas=[MoEExpert], message=_gate_mode_message)
    check_config(parsed, source, allow_all_same)
    return parsed


def check_config(config: MoEConfig, source: str, allow_all_same: bool) -> None:
    """mergekit-moe's refusals, each with one message: top-k above the expert count, prompt-based
    gates without prompts, experts that all have the same prompts or are all the same model
    (useless without training, unless ``allow_all_same``)."""
    from mergeforge.dtypes import parse_recipe_dtype

    parse_recipe_dtype(config.dtype, f"{source}: field 'dtype'")
    count = len(config.experts)
    if config.experts_per_token > count:
        raise RecipeError(f"{source}: field 'experts_per_token': {config.experts_per_token} is more than the {count} expert(s)")
    if config.gate_mode in PROMPT_GATES:
        for index, expert in enumerate(config.experts + (config.shared_experts or [])):
            group = "experts" if index < count else "shared_experts"
            position = index if index < count else index - count
            if not expert.positive_prompts:
                raise RecipeError(f"{source}: field '{group}.{position}.positive_prompts': gate_mode '{config.gate_mode}' "
                                  f"needs prompts for every expert ({expert.source_model} has none)")
        if count > 1 and len({(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in config.experts}) == 1:
            raise RecipeError(f"{source}: every expert has the same prompts, so the router cannot tell them apart; "
                              "give each expert prompts for what it should receive")
    if count > 1 and not allow_all_same and len({e.source_model for e in config.experts}) == 1:
        raise RecipeError(f"{source}: every expert is the same model ({config.experts[0].source_model}): the MoE would cost more "
                          f"and answer the same; pass {ALLOW_ALL_SAME_FLAG} to build it anyway (to train it afterwards)")
    if config.shared_parameters and not config.shared_method:
        raise RecipeError(f"{source}: field 'shared_parameters' is set without 'shared_method' (the method to merge the "
                          "non-MLP tensors with)")
    if config.shared_method:
        from mergeforge.methods.registry import get_method

        try:
            get_method(config.shared_method)
        except RecipeError as exc:
            raise RecipeError(f"{source}: field 'shared_method': {str(exc).removeprefix('merge_method: ')}") from None
    shared = config.shared_experts or []
    if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
        raise RecipeError(f"{source}: field 'shared_experts': give prompts for every shared expert or for none")
