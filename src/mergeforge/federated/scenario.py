"""The scenario file of ``mergeforge federated``: clients, shards, rounds and the aggregators.

A strict pydantic schema (an unknown or misspelt field is an error, never ignored), read from
YAML; every error is one :class:`~mergeforge.errors.RecipeError` naming the file and the field.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergeforge.config_file import load_config_file
from mergeforge.errors import RecipeError


class Aggregator(BaseModel):
    """One server-side aggregation to compare: a catalogue method and its parameters."""

    model_config = ConfigDict(extra="forbid")

    method: str
    name: str | None = None  # the label in the report (default: the method; FedAvg is "linear")
    parameters: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.method


class Malicious(BaseModel):
    """Clients that send a scaled update, global + scale·(trained − global): the model-poisoning
    attack that a weighted average passes on in full and robust statistics bound."""

    model_config = ConfigDict(extra="forbid")

    clients: int = Field(1, ge=0)  # the first N clients (node 101, 102, ...) attack
    scale: float = -10.0  # negative: pushes the global model away from what the clients learn


class Upload(BaseModel):
    """What clients send: their whole model, or a sparsified update (mergeforge.federated.sparse)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dense", "topk", "dare"] = "dense"
    density: float = Field(0.1, gt=0.0, le=1.0)  # share of each tensor's update entries sent (topk, dare)


class Split(BaseModel):
    """How the skills' training examples are shared out to the clients.

    - ``skills``: client k holds ``skills_per_client`` whole skills, k, k+1, ... (cyclically),
      ``examples_per_client`` examples of each;
    - ``dirichlet``: every client may hold every skill; for each skill, the clients' shares of
      its examples are drawn from Dirichlet(α, ..., α) (as Hsu et al. 2019, arXiv:1909.06335,
      split classes): small α gives each skill to few clients, large α tends to an even split.
      Each skill's pool holds as many examples as the ``skills`` split would hand out in all
      (``examples_per_client`` × clients × ``skills_per_client`` ÷ skills), so the two compare
      on the same data.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["skills", "dirichlet"] = "skills"
    alpha: float | None = Field(None, gt=0.0)  # the Dirichlet concentration; dirichlet only, and required there

    @model_validator(mode="after")
    def _alpha_goes_with_dirichlet(self) -> Split:
        if self.kind == "dirichlet" and self.alpha is None:
            raise ValueError("the dirichlet split needs 'alpha' (e.g. 0.5)")
        if self.kind != "dirichlet" and self.alpha is not None:
            raise ValueError(f"'alpha' applies to the dirichlet split, not '{self.kind}'")
        return self


class Scenario(BaseModel):
    """A simulated federation on the zoo's tasks (defaults: a run of about a minute on a CPU)."""

    model_config = ConfigDict(extra="forbid")

    zoo: str | None = None  # a built zoo folder; default: the tiny zoo in the cache, built if missing
    skills: list[str] | None = None  # the tasks shared out to clients (default: every zoo skill)
    clients: int = Field(4, ge=1)
    skills_per_client: int = Field(2, ge=1)  # non-IID: client k holds skills k, k+1, ... (cyclically)
    examples_per_client: int = Field(200, ge=1)  # per skill; disjoint slices of the training split
    split: Split = Field(default_factory=lambda: Split.model_validate({}))  # skills (above) or dirichlet
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)  # clients sampled per round
    rounds: int = Field(3, ge=1)
    local_steps: int = Field(20, ge=1)  # E: AdamW steps per client per round
    learning_rate: float = Field(2e-3, gt=0.0)
    batch_size: int = Field(16, ge=1)
    eval_examples: int = Field(64, ge=1)  # test examples per skill scored after each round
    seed: int = 0
    malicious: Malicious | None = None
    upload: Upload = Field(default_factory=lambda: Upload.model_validate({}))
    references: bool = False  # also centralised training with the same steps and a one-shot merge of lone clients
    aggregators: list[Aggregator] = Field(default_factory=lambda: [Aggregator(method="linear", name="fedavg")], min_length=1)

    @model_validator(mode="after")
    def _labels_are_unique(self) -> Scenario:
        labels = [aggregator.label for aggregator in self.aggregators]
        duplicate = next((label for label in labels if labels.count(label) > 1), None)
        if duplicate is not None:
            raise ValueError(f"two aggregators are named '{duplicate}'; give one a 'name'")
        if self.malicious is not None and self.malicious.clients > self.clients:
            raise ValueError(f"malicious.clients is {self.malicious.clients}, more than the {self.clients} clients")
        return self


def check_aggregators(scenario: Scenario, source: str) -> None:
    """Unknown methods or parameters fail before any client trains."""
    from mergeforge.federated.aggregate import check_method

    for index, aggregator in enumerate(scenario.aggregators):
        try:
            check_method(aggregator.method, aggregator.parameters)
        except RecipeError as exc:
            raise RecipeError(f"{source}: field 'aggregators.{index}': {exc}") from None


def load_scenario(scenario: Scenario | dict[str, Any] | str | os.PathLike[str]) -> Scenario:
    """A validated :class:`Scenario` from an object, a dict or a YAML file."""
    if isinstance(scenario, Scenario):
        check_aggregators(scenario, "scenario")
        return scenario
    parsed, source, _ = load_config_file(scenario, Scenario, what="scenario file", source="scenario",
                                         mapping="a scenario must be a mapping (clients, rounds, aggregators, ...)",
                                         schemas=[Aggregator, Malicious, Upload, Split])
    check_aggregators(parsed, source)
    return parsed
