"""Golden bytes: tiny TIES and DARE merges of models whose values are exact (no random draws), pinned
by sha256, through both executors and the in-memory API. A change to the math, the masks, DARE's
draws, the rounding or the file layout changes these hashes, so it cannot pass unnoticed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import mergeforge
from mergeforge.checkpoint.writer import save_state_dict

# The same at 6b54959, before the two engines became one plan with two executors.
GOLDEN = {
    "ties": "81329d22837dcfe38b79b5f3b7da487e7976362877305af32d4a9b47c129e8f9",
    "dare_ties": "b951204b625f575865ce8789413e996f529e6c7e93c0fff75425ae7fe36a8613",
}


def exact_state(shift: int) -> dict[str, torch.Tensor]:
    """Dyadic values (exact in float32): the base for shift 0, fine-tunes for others."""
    index = torch.arange(12, dtype=torch.float32)
    delta = ((index * (2 * shift + 1)) % 7 - 3) / 64 if shift else torch.zeros(12)
    return {
        "model.layers.0.mlp.weight": ((index - 5.5) / 8 + delta).reshape(3, 4),
        "model.layers.1.mlp.weight": ((5.5 - index) / 16 + delta.flip(0)).reshape(4, 3),
        "model.norm.weight": torch.ones(4) + delta[:4],
    }


@pytest.fixture(scope="module")
def exact_models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("exact")
    folders = []
    for shift in range(3):
        folder = root / f"m{shift}"
        folder.mkdir()
        save_state_dict(exact_state(shift), folder)
        folders.append(folder)
    return folders


def recipe(method: str, folders: list[Path]) -> dict:
    return {"merge_method": method, "base_model": str(folders[0]),
            "models": [{"model": str(f), "parameters": {"weight": w, "density": 0.5}} for f, w in zip(folders[1:], (1.0, 0.6))]}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_a_tiny_merge_has_pinned_bytes_on_either_executor_and_in_memory(exact_models, tmp_path, method):
    for executor in ("numpy", "torch"):
        mergeforge.merge(recipe(method, exact_models), tmp_path / executor, quiet=True, seed=11, executor=executor)
        assert sha256(tmp_path / executor / "model.safetensors") == GOLDEN[method], executor
    states = [exact_state(shift) for shift in (1, 2)]
    merged = mergeforge.merge_state_dicts(method, states, exact_state(0), parameters={"density": 0.5},
                                          model_parameters=[{"weight": 1.0}, {"weight": 0.6}], seed=11)
    (tmp_path / "memory").mkdir()
    save_state_dict(merged, tmp_path / "memory")
    assert sha256(tmp_path / "memory" / "model.safetensors") == GOLDEN[method]
    if method == "ties":  # the pinned bytes are TIES itself, computed directly in float64
        base = exact_state(0)
        for name, tensor in merged.items():
            deltas = [(state[name].double() - base[name].double()).flatten() for state in states]
            trimmed = []
            for delta, weight in zip(deltas, (1.0, 0.6)):
                keep = torch.zeros_like(delta)
                keep[delta.abs().argsort(descending=True, stable=True)[: int(0.5 * delta.numel())]] = 1
                trimmed.append(delta * keep * weight)
            stacked = torch.stack(trimmed)
            agree = (torch.sign(stacked) == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)).double()
            divisor = (agree * torch.tensor([1.0, 0.6], dtype=torch.float64)[:, None]).sum(0)
            expected = base[name].double().flatten() + (stacked * agree).sum(0) / divisor.clamp(min=1e-12).where(divisor > 0, 1.0)
            torch.testing.assert_close(tensor.double().flatten(), expected, rtol=0, atol=1e-6, msg=name)
