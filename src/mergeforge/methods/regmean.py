"""RegMean: merge each linear layer by the closed-form solution of a regression on its inputs.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR 2023,
arXiv:2212.09849). For a linear layer y = W x with inputs X_i (one row per token) from model i's
calibration data, the merged weight minimises Σ_i ‖X_i W*ᵀ − X_i W_iᵀ‖², whose solution is

    W*ᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ,    G_i = X_iᵀ X_i.

The paper shrinks the off-diagonal entries of each Gram matrix, G̃_i = α G_i + (1 − α) diag(G_i),
which interpolates between this regression (α = 1) and a per-input-feature weighted average
(α = 0); α = 0.9 by default. Every other tensor (biases, norms, embeddings) is the plain average.
Linear layers are ``nn.Linear`` and GPT-2's ``Conv1D`` (whose weight is stored transposed).

Not in the paper: a ridge of 1e-6 · mean(diag Σ G̃_i) pulls directions that no calibration input
visits toward the plain average of the W_i, so the solve stays well-posed when a feature is never
active (it changes nothing measurable elsewhere).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mergeforge.errors import MethodError
from mergeforge.methods.registry import Param, register_method

if TYPE_CHECKING:
    from mergeforge.calibration.context import CalibrationContext

RIDGE = 1e-6


@dataclass(frozen=True)
class InputGrams:
    """One linear layer's statistics: each model's input Gram matrix, and which dimension of the
    weight meets the input (1 for ``nn.Linear``'s ``[out, in]``, 0 for GPT-2's ``Conv1D``)."""

    grams: list[torch.Tensor]
    input_dim: int = 1


@dataclass(frozen=True)
class RegressionSums:
    """One linear layer's statistics summed over the models while they are calibrated.

    With each model's weight Wᵢ in ``[in, out]`` orientation: ``gram_sum`` = Σᵢ Gᵢ, ``weighted``
    = Σᵢ Gᵢ Wᵢ and ``weighted_diagonal`` = Σᵢ diag(Gᵢ) Wᵢ. The shrinkage is linear in G, so these
    give the merge for any α: Σ G̃ᵢ = α·ΣGᵢ + (1 − α)·diag(ΣGᵢ), Σ G̃ᵢWᵢ = α·ΣGᵢWᵢ + (1 − α)·Σ diag(Gᵢ)Wᵢ.
    They take in² + 2·in·out numbers against k·in² for k models' Grams, so at ten SmolLM2-135M
    models the statistics shrink from 8.1 GB to 2.4 GB (see :func:`collect_grams`).
    ``weight_sums`` is Σ of each model's calibrated weight entries: the merge checks it is given
    the same weights (a vocabulary change or another source would make the sums wrong).
    """

    gram_sum: torch.Tensor
    weighted: torch.Tensor
    weighted_diagonal: torch.Tensor
    weight_sums: tuple[float, ...]
    input_dim: int = 1

    @classmethod
    def of(cls, grams: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], input_dim: int = 1) -> RegressionSums:
        """The sums over ``grams`` (float64) and ``weights`` (as stored: ``[out, in]`` when ``input_dim`` is 1)."""
        sums = cls.empty(torch.zeros_like(grams[0], dtype=torch.float64), weights[0], input_dim)
        for gram, weight in zip(grams, weights):
            sums.gram_sum.add_(gram)
            sums.add(gram, weight)
        return sums

    @classmethod
    def empty(cls, gram_sum: torch.Tensor, weight: torch.Tensor, input_dim: int) -> RegressionSums:
        """Zero sums for a weight like ``weight``, around a (possibly shared) Gram sum."""
        size = (gram_sum.shape[0], weight.numel() // gram_sum.shape[0])
        return cls(gram_sum, torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64), (), input_dim)

    def add(self, gram: torch.Tensor, weight: torch.Tensor) -> None:
        """Add one model's weight to the weighted sums (not to ``gram_sum``, which layers fed the
        same input share: the caller adds each model's Gram to it once)."""
        stored = _in_by_out(weight, self.input_dim)
        self.weighted.add_(gram @ stored)
        self.weighted_diagonal.add_(stored * torch.diagonal(gram).unsqueeze(1))
        object.__setattr__(self, "weight_sums", (*self.weight_sums, float(weight.double().sum())))


def _in_by_out(weight: torch.Tensor, input_dim: int) -> torch.Tensor:
    """The weight as a float64 ``[in, out]`` matrix (``nn.Linear`` stores ``[out, in]``, ``Conv1D`` ``[in, out]``)."""
    return (weight.T if input_dim == 1 else weight).to(torch.float64)


def collect_grams(context: CalibrationContext) -> dict[str, InputGrams | RegressionSums]:
    """Every input model's linear-layer input statistics on its own calibration examples.

    Layers fed one input share its Gram (q/k/v, gate/up). For each such group the smaller form is
    kept: every model's Gram (k·in² numbers) or the group's :class:`RegressionSums` (in² + 2·in·Σout),
    which are accumulated model by model, so only one model's Grams are held at a time.
    """
    from mergeforge.calibration.gram import linear_input_grams, linear_layers

    kept: dict[str, list[torch.Tensor]] = {}  # group owner -> each model's Gram
    sums: dict[str, RegressionSums] = {}  # layer -> its sums
    owners: dict[str, str] = {}  # layer -> the first layer of its group
    input_dims: dict[str, int] = {}
    batches = {ref: context.batches(ref) for ref in context.input_refs}
    with context.progress_bar(sum(len(b) for b in batches.values()), "regmean") as bar:
        for index, ref in enumerate(context.input_refs):
            model = context.load_model(ref)
            layers = linear_layers(model)
            weights = {name: module.get_parameter("weight") for name, (module, _) in layers.items()}
            grams = linear_input_grams(model, batches[ref], bar)
            if index == 0:
                input_dims = {name: dim for name, (_, dim) in layers.items()}
                owners, sums = _choose_forms(grams, weights, input_dims, set(context.tensor_names), len(context.input_refs))
            with torch.no_grad():
                for name, owner in owners.items():
                    if name not in grams or grams[name] is not grams[owner]:  # models of one architecture share alike
                        raise MethodError(f"regmean: model '{ref}' does not run layer '{name}' as the first model does")
                    if name in sums:
                        if name == owner:
                            sums[name].gram_sum.add_(grams[name])
                        sums[name].add(grams[name], weights[name])
                    elif name == owner:
                        kept.setdefault(owner, []).append(grams[name])
            del model, grams, layers, weights
    statistics: dict[str, InputGrams | RegressionSums] = dict(sums)
    for name, owner in owners.items():
        if name not in sums:
            statistics[name] = InputGrams(kept[owner], input_dims[name])
    return statistics


def _choose_forms(grams: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], input_dims: Mapping[str, int],
                  wanted: set[str], count: int) -> tuple[dict[str, str], dict[str, RegressionSums]]:
    """From the first model: each merged layer's group owner (the first layer sharing its Gram),
    and empty sums for the layers of every group where sums take less room than ``count`` Grams."""
    first: dict[int, str] = {}
    owners = {name: first.setdefault(id(gram), name) for name, gram in grams.items() if name in wanted}
    groups: dict[str, list[str]] = {}
    for name, owner in owners.items():
        groups.setdefault(owner, []).append(name)
    sums: dict[str, RegressionSums] = {}
    for owner, members in groups.items():
        size = grams[owner].shape[0]
        outputs = sum(weights[name].numel() // size for name in members)
        if size * size + 2 * size * outputs < count * size * size:
            gram_sum = torch.zeros_like(grams[owner])
            for name in members:
                sums[name] = RegressionSums.empty(gram_sum, weights[name], input_dims[name])
    return owners, sums


@register_method(
    "regmean",
    params=[
        Param("alpha", 0.9, low=0, high=1,
              help="scale of the Gram matrices' off-diagonal entries (1: exact regression, 0: diagonal only)"),
    ],
    math="per linear layer W*ᵀ = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢᵀ, G̃ᵢ = α·XᵢᵀXᵢ + (1−α)·diag(XᵢᵀXᵢ); other tensors averaged",
    citation="RegMean, Jin et al. ICLR 2023 (arXiv:2212.09849)",
    calibrate=collect_grams,
    statistics_ignore_params=True,
    notes="Data-aware: needs a top-level 'calibration:' field; one forward pass per batch on each whole model records the "
    "inputs of every nn.Linear. A per-model mapping in 'calibration.data' gives each model its own task data.",
)
def regmean(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    alpha: float,
    statistics: InputGrams | RegressionSums | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    if statistics is None or tensors[0].dim() != 2:
        return torch.stack(tensors).mean(0)
    if isinstance(statistics, RegressionSums):
        sums = statistics
        if len(sums.weight_sums) != len(tensors):
            raise MethodError(f"regmean: statistics for {len(sums.weight_sums)} models, but {len(tensors)} inputs")
        for index, (tensor, calibrated) in enumerate(zip(tensors, sums.weight_sums)):
            given = tensor.to(torch.float64)
            if given.numel() != sums.weighted.numel() or abs(float(given.sum()) - calibrated) > 1e-6 * float(given.abs().sum()):
                raise MethodError(f"regmean: input {index}'s weight of shape {list(tensor.shape)} is not the one its "
                                  "calibration ran with (the regression sums hold that model's weights)")
    else:
        input_dim = statistics.input_dim if isinstance(statistics, InputGrams) else 1
        grams = statistics.grams if isinstance(statistics, InputGrams) else list(statistics)
        if len(grams) != len(tensors):
            raise MethodError(f"regmean: statistics for {len(grams)} models, but {len(tensors)} inputs")
        in_features = tensors[0].shape[input_dim]
        for gram in grams:
            if tuple(gram.shape) != (in_features, in_features):
                raise MethodError(f"regmean: Gram matrix of shape {list(gram.shape)} for a weight of shape {list(tensors[0].shape)}")
        # float64: Gram matrices of activations are badly conditioned.
        device = tensors[0].device
        sums = RegressionSums.of([gram.to(device=device, dtype=torch.float64) for gram in grams], tensors, input_dim)
    return solve_regression(sums, tensors, alpha)


def solve_regression(sums: RegressionSums, tensors: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """W* in ``[in, out]`` orientation, (Σ G̃ᵢ + r·I)⁻¹ (Σ G̃ᵢWᵢ + r·W̄), stored as the inputs are."""
    device = tensors[0].device
    gram_sum = sums.gram_sum.to(device)
    diagonal = torch.diag(torch.diagonal(gram_sum))
    shrunk = gram_sum * alpha + diagonal * (1 - alpha)
    weighted = sums.weighted.to(device) * alpha + sums.weighted_diagonal.to(device) * (1 - alpha)
    ridge = RIDGE * float(torch.diagonal(shrunk).mean().clamp_min(1e-12))
    average = _in_by_out(torch.stack(tensors).to(torch.float64).mean(0), sums.input_dim)
    eye = torch.eye(shrunk.shape[0], dtype=torch.float64, device=device)
    merged = torch.linalg.solve(shrunk + ridge * eye, weighted + ridge * average)
    return (merged.T if sums.input_dim == 1 else merged).to(tensors[0].dtype).contiguous()
