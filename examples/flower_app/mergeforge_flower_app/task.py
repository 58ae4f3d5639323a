"""The model and data both apps share: a small regression whose clients hold different slices of
the input space (non-IID), so the global model needs every client's update."""

from __future__ import annotations

import torch

FEATURES = 8


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # every process builds the same initial model
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]


def client_data(partition: int, examples: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition``'s inputs sit around its own centre."""
    generator = torch.Generator().manual_seed(seed * 1000 + partition)
    x = torch.randn(examples, FEATURES, generator=generator) * 0.7 + (partition - 0.5) * 1.5
    return x, target(x)


def test_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh inputs around both clients' centres."""
    parts = [client_data(partition, 128, seed=1) for partition in (0, 1)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss)


def mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))
