"""The checks every MoE build runs on its output before it is moved into place.

The output folder is loaded with transformers, as a user loads it, in float32:

- **base**: with every MoE block computing the base's dense MLP instead (what an MoE whose
  experts are all copies of the base computes, whatever the routing), the model's logits are the
  base's. This proves everything but the experts: config, attention, norms, embeddings, head.
- **experts**: at every layer, with the router set so that expert ``e`` takes every token (row
  ``e`` picks out one input coordinate that is 1, scaled by 100; the other rows are 0), the MoE
  block's output is expert ``e``'s dense MLP on the same inputs, computed from its own
  checkpoint (scaled by its ``residual_scale``). An expert with ``noise_scale`` is compared with
  the weights written for it instead, since its noise is part of the recipe. Where the MoE has a
  shared expert (Qwen2-MoE), its sigmoid gate is closed the same way for these checks, then
  opened beside expert 0: the block's output must be the sum of both dense MLPs.

Each check reports its largest error relative to the reference's largest value; above
:data:`TOLERANCE` the build fails and leaves no output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergeforge.errors import CheckpointError
from mergeforge.moe.architectures import MoEArchitecture
from mergeforge.moe.config import MoEExpert

TOLERANCE = 1e-4
PROMPT_TOKENS = (2, 12)  # random token ids for the logits check
BLOCK_TOKENS = 6  # random inputs per MoE block check


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def moe_block(layer: torch.nn.Module) -> torch.nn.Module:
    """The MoE block of a loaded decoder layer (the module with a router and experts)."""
    for module in layer.modules():
        if hasattr(module, "gate") and hasattr(module, "experts"):
            return module
    raise RuntimeError("internal error: no MoE block in the loaded layer")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replaced(original: Any, mlp: torch.nn.Module) -> Any:
    """A block forward that returns the dense ``mlp``'s output in the block's own output structure
    (transformers 4.x blocks also return their router logits)."""

    def forward(hidden_states: torch.Tensor) -> Any:
        output = original(hidden_states)
        dense = mlp(hidden_states)
        return (dense, *output[1:]) if isinstance(output, tuple) else dense

    return forward


def _dense_mlp(weights: dict[str, torch.Tensor], activation: Any, x: torch.Tensor) -> torch.Tensor:
    return (activation(x @ weights["gate_proj"].T) * (x @ weights["up_proj"].T)) @ weights["down_proj"].T


def run_self_tests(folder: Path, base_folder: Path, expert_folders: list[Path], experts: list[MoEExpert],
                   architecture: MoEArchitecture, shared: tuple[Path, MoEExpert] | None = None,
                   shared_tensors_merged: bool = False) -> dict[str, Any]:
    """Run the checks on the MoE in ``folder``; raise :class:`CheckpointError` when one fails.
    With a ``shared`` expert (folder, recipe entry), each expert is checked with the shared
    expert's gate closed, and the shared expert with its gate open beside expert 0. With
    ``shared_tensors_merged`` (``shared_method``), the base check's reference is the base with
    the MoE's merged non-MLP tensors in place of its own: it then proves the layout, not the merge."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import ACT2FN

    from mergeforge.checkpoint.reader import open_checkpoint
    from mergeforge.dtypes import to_torch
    from mergeforge.moe.build import residual_scaled

    moe = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_folder, local_files_only=True, dtype=torch.float32).eval()
    blocks = [moe_block(layer) for layer in moe.model.layers]
    generator = torch.Generator().manual_seed(0)
    with open_checkpoint(folder) as written:
        stored = to_torch(written.info("model.norm.weight").dtype)  # the MoE's own dtype: the base is rounded to it
        with torch.no_grad():
            for name, parameter in base.named_parameters():
                if shared_tensors_merged and ".mlp." not in name and written.has(name):
                    parameter.copy_(written.read(name).float())
                else:
                    parameter.copy_(parameter.to(stored).float())
        ids = torch.randint(0, int(base.config.vocab_size), PROMPT_TOKENS, generator=generator)
        base_error = _base_check(moe, base, blocks, ids)
        report: dict[str, Any] = {"tolerance": TOLERANCE, "base_logits_error": base_error, "expert_mlp_errors": []}
        if base_error > TOLERANCE:
            raise CheckpointError(f"{folder}: self-test failed: with the base's MLPs the MoE's logits differ from the base's "
                                  f"by {base_error:.2e} (relative; the limit is {TOLERANCE:g})")
        activation = ACT2FN[moe.config.hidden_act]
        inputs = torch.randn((1, BLOCK_TOKENS, int(moe.config.hidden_size)), generator=generator)
        inputs[..., -1] = 1.0  # the coordinate the router rows below pick out
        def reference(source: Any, expert: MoEExpert, layer: int, slot: int | None) -> torch.Tensor:
            """The dense MLP output on ``inputs`` of expert ``slot`` (None: the shared expert), from
            its source checkpoint (or, with noise, from what was written for it)."""
            weights = {}
            for projection in ("gate_proj", "up_proj", "down_proj"):
                if expert.noise_scale:
                    tensor = _written_projection(written, architecture, layer, slot, projection)
                else:
                    name = f"model.layers.{layer}.mlp.{projection}.weight"
                    tensor = residual_scaled(source.read(name).float(), name, expert)
                weights[projection] = tensor.to(stored).float()
            return _dense_mlp(weights, activation, inputs)

        expert_outputs: list[torch.Tensor] = []  # expert 0's, per layer, for the shared expert's check
        for index, (expert, source_folder) in enumerate(zip(experts, expert_folders, strict=True)):
            with open_checkpoint(source_folder) as source:
                worst = 0.0
                for layer, block in enumerate(blocks):
                    expected = reference(source, expert, layer, index)
                    if index == 0:
                        expert_outputs.append(expected)
                    output = _routed_alone(block, index, inputs, shared_gate=-100.0 if shared else None)
                    worst = max(worst, _relative_error(output, expected))
            report["expert_mlp_errors"].append(worst)
            if worst > TOLERANCE:
                raise CheckpointError(f"{folder}: self-test failed: expert {index} ({expert.source_model}), routed alone, "
                                      f"differs from its MLP by {worst:.2e} (relative; the limit is {TOLERANCE:g})")
        if shared is not None:
            with open_checkpoint(shared[0]) as source:
                worst = 0.0
                for layer, block in enumerate(blocks):
                    expected = expert_outputs[layer] + reference(source, shared[1], layer, None)
                    worst = max(worst, _relative_error(_routed_alone(block, 0, inputs, shared_gate=100.0), expected))
            report["shared_mlp_error"] = worst
            if worst > TOLERANCE:
                raise CheckpointError(f"{folder}: self-test failed: the shared expert ({shared[1].source_model}) differs from its "
                                      f"MLP by {worst:.2e} (relative; the limit is {TOLERANCE:g})")
    return report


def _written_projection(written: Any, architecture: MoEArchitecture, layer: int, slot: int | None, projection: str) -> torch.Tensor:
    """One projection of expert ``slot`` (None: the shared expert) as the MoE holds it, in float32."""
    if slot is None:
        return written.read(architecture.shared_tensor(layer, projection)).float()
    if not architecture.fused_layout:
        return written.read(architecture.expert_tensor(layer, slot, projection)).float()
    if projection == "down_proj":
        return written.read(architecture.FUSED_DOWN.format(layer=layer))[slot].float()
    gate_up = written.read(architecture.FUSED_GATE_UP.format(layer=layer))[slot].float()
    half = gate_up.shape[0] // 2
    return gate_up[:half] if projection == "gate_proj" else gate_up[half:]


def _base_check(moe: Any, base: Any, blocks: list[torch.nn.Module], ids: torch.Tensor) -> float:
    """The logits error of the MoE whose blocks compute the base's dense MLPs, against the base."""
    originals = [block.forward for block in blocks]
    for block, dense_layer, original in zip(blocks, base.model.layers, originals, strict=True):
        block.forward = _replaced(original, dense_layer.mlp)
    try:
        with torch.no_grad():
            return _relative_error(moe(input_ids=ids).logits, base(input_ids=ids).logits)
    finally:
        for block, forward in zip(blocks, originals, strict=True):
            block.forward = forward


def _routed_alone(block: torch.nn.Module, expert: int, inputs: torch.Tensor, shared_gate: float | None = None) -> torch.Tensor:
    """The block's output with its router set so that ``expert`` takes every token (its row picks
    out the inputs' last coordinate, 1, scaled by 100; the other rows are 0) and, with
    ``shared_gate``, the shared expert's gate set to sigmoid(``shared_gate``) the same way (±100:
    closed or open); the weights are restored."""
    rows: list[tuple[torch.Tensor, int, float]] = [(getattr(block.gate, "weight"), expert, 100.0)]  # noqa: B009 - untyped parameter
    if shared_gate is not None:
        rows.append((getattr(block, "shared_expert_gate").weight, 0, shared_gate))  # noqa: B009
    saved = [weight.detach().clone() for weight, _, _ in rows]
    with torch.no_grad():
        try:
            for weight, row, value in rows:
                weight.zero_()
                weight[row, -1] = value
            return _first(block(inputs.clone()))
        finally:
            for (weight, _, _), old in zip(rows, saved, strict=True):
                weight.copy_(old)
