"""LoRA adapters for the zoo (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685), trained in plain PyTorch and saved in PEFT's file format
(:mod:`mergeforge.checkpoint.peft`).

A LoRA linear layer computes ``W x + (alpha / r) * B (A x)`` with ``W`` frozen, ``A`` of shape
``[r, in]`` (Kaiming-uniform at start) and ``B`` of shape ``[out, r]`` (zero at start, so training
starts from the base model). When ``peft`` is installed, the tests check that it loads the saved
adapters to the same outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergeforge.checkpoint.peft import PEFT_PREFIX


class LoraLinear(torch.nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        # PEFT's default initialisation: A like nn.Linear, B zero.
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        torch.nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.base(inputs) + self.lora_B(self.lora_A(inputs)) * self.scaling


def attach_lora(
    model: torch.nn.Module, target_modules: Sequence[str], rank: int, alpha: float, seed: int
) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose last name part is in ``target_modules``
    (PEFT's matching rule for a list of names). Returns the wrapped modules' paths, in order."""
    generator = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, rank, alpha, generator))
    return [name for name, _ in targets]


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names."""
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach().clone().contiguous()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach().clone().contiguous()
    return state
