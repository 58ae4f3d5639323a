"""``build_moe``: a Mixture-of-Experts checkpoint from dense fine-tunes of one base.

The MoE takes every tensor but the MLPs from ``base_model``, each expert's MLP projections as
one expert per layer, and a router per layer from the gate mode. Tensors stream from the input
checkpoints (one at a time, through the same reader and writer as merges) into a temporary
folder; the self-tests (:mod:`mergeforge.moe.selftest`) run on it, and only then is it renamed
into place. A failed check leaves no output.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mergeforge.checkpoint import folder as folder_files
from mergeforge.checkpoint.reader import Checkpoint, open_checkpoint
from mergeforge.checkpoint.writer import (
    DEFAULT_SHARD_BYTES,
    OutputTensor,
    ShardedWriter,
    output_error,
)
from mergeforge.dtypes import from_torch, parse_recipe_dtype, to_torch
from mergeforge.errors import CheckpointError, OutputError
from mergeforge.moe.architectures import MLP_TENSOR, MoEArchitecture, choose_architecture
from mergeforge.moe.config import MoEConfig, MoEExpert

CONFIG_FILE = "mergekit_moe_config.yml"  # the recipe, under mergekit-moe's name for it
REPORT_FILE = "moe_report.json"


@dataclass
class MoEResult:
    out_dir: Path
    architecture: str
    experts: int
    experts_per_token: int
    total_parameters: int
    active_parameters: int  # per token: everything but the MLPs, plus experts_per_token experts
    self_tests: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None  # gate_mode calibrated: per-layer fit (moe.router)
    routing: dict[str, float] | None = None  # routing accuracy per prompt set (moe.report), where there are prompts


def _open(ref: str, relative_to: Path | None) -> Checkpoint:
    checkpoint = open_checkpoint(ref, relative_to)
    if not isinstance(checkpoint, Checkpoint) or checkpoint.config is None:
        raise CheckpointError(f"model '{ref}': an MoE is built from Hugging Face model folders with a config.json")
    return checkpoint


def _check_compatible(base: Checkpoint, experts: list[Checkpoint], all_tensors: bool = False) -> list[str]:
    """The base's MLP tensor names; every expert must have them (every tensor of the base, with
    ``all_tensors``), with the base's shapes."""
    assert base.config is not None
    model_type = base.config.get("model_type")
    mlp = [name for name in base.names() if MLP_TENSOR.match(name)]
    if not mlp:
        raise CheckpointError(f"model '{base.ref}': no MLP tensors (model.layers.N.mlp.gate_proj/up_proj/down_proj) to make experts of")
    for expert in experts:
        assert expert.config is not None
        if expert.config.get("model_type") != model_type:
            raise CheckpointError(f"model '{expert.ref}': is a '{expert.config.get('model_type')}' model and the base "
                                  f"'{base.ref}' a '{model_type}' one; every expert must have the base's architecture")
        for name in base.names() if all_tensors else mlp:
            if not expert.has(name):
                raise CheckpointError(f"model '{expert.ref}': has no tensor '{name}' (the base has it)")
            if expert.info(name).shape != base.info(name).shape:
                raise CheckpointError(f"model '{expert.ref}': tensor '{name}' has shape {list(expert.info(name).shape)}, "
                                      f"the base {list(base.info(name).shape)}")
    return mlp


def residual_scaled(tensor: torch.Tensor, name: str, expert: MoEExpert) -> torch.Tensor:
    """``residual_scale`` multiplies an expert's down projection: its contribution to the residual stream."""
    if expert.residual_scale is not None and name.endswith("down_proj.weight"):
        return tensor.float() * expert.residual_scale
    return tensor


def _expert_tensor(checkpoint: Checkpoint, name: str, expert: MoEExpert, generator: torch.Generator) -> torch.Tensor:
    """An expert's MLP tensor with its ``noise_scale`` and ``residual_scale`` applied (mergekit's order)."""
    tensor = checkpoint.read(name)
    if expert.noise_scale:
        tensor = tensor.float() + torch.randn(tensor.shape, generator=generator) * expert.noise_scale
    return residual_scaled(tensor, name, expert)


def _shared_merger(config: MoEConfig, experts: list[Checkpoint], seed: int) -> Callable[[str, torch.Tensor], torch.Tensor] | None:
    """With ``shared_method``: a function that merges one non-MLP tensor of the experts (each
    source model once) with the base's, through the engine's in-memory merge."""
    if not config.shared_method:
        return None
    from mergeforge.engine.api import merge_state_dicts
    from mergeforge.errors import RecipeError

    method = config.shared_method
    sources = list({c.ref: c for c in experts}.values())

    def merged(name: str, base_tensor: torch.Tensor) -> torch.Tensor:
        try:
            return merge_state_dicts(method, [{name: c.read(name)} for c in sources], base={name: base_tensor},
                                     parameters=config.shared_parameters, seed=seed)[name]
        except RecipeError as exc:
            raise RecipeError(f"moe config: shared_method '{method}', tensor '{name}': {exc}") from None

    return merged


def build_moe(config: MoEConfig, out_dir: str | Path, *, relative_to: Path | None = None, overwrite: bool = False,
              copy_tokenizer: bool = True, seed: int = 0, self_test: bool = True, shard_bytes: int = DEFAULT_SHARD_BYTES,
              recipe_text: str | None = None, fused: bool = False, progress: Callable[[str], None] = lambda line: None) -> MoEResult:
    """Build the MoE of ``config`` (see :func:`mergeforge.moe.config.load_moe_config`) into ``out_dir``;
    with ``fused``, in transformers 5's fused expert layout (:meth:`MoEArchitecture.fused`)."""
    from mergeforge.moe.selftest import run_self_tests

    out_dir = Path(out_dir)
    opened: list[Checkpoint] = []
    try:
        for ref in [config.base_model, *(e.source_model for e in config.experts + (config.shared_experts or []))]:
            opened.append(_open(ref, relative_to))
        base, experts, shared = opened[0], opened[1:len(config.experts) + 1], opened[len(config.experts) + 1:]
        folder_files.check_output_location(out_dir, [c.folder for c in opened], overwrite)
        plan = _plan(config, base, experts, shared, seed, fused, progress)
        parent = out_dir.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        if plan.bytes > shutil.disk_usage(parent).free:
            raise OutputError(f"{parent}: disk full: the MoE takes {plan.bytes / 1e9:.1f} GB")
        result = MoEResult(out_dir, plan.architecture.name, len(experts), config.experts_per_token,
                           total_parameters=plan.parameters,
                           active_parameters=plan.parameters - (len(experts) - config.experts_per_token) * plan.per_expert)
        with folder_files.atomic_output_folder(out_dir) as temp:
            _write_weights(temp, plan, shard_bytes, progress)
            _write_files(temp, base, config, plan, copy_tokenizer, recipe_text)
            result.calibration, routing = _fit_and_route(temp, base.folder, config, plan.architecture, progress)
            if self_test:
                progress("self-tests: the MoE of base MLPs against the base, each expert routed alone against its source")
                result.self_tests = run_self_tests(temp, base.folder, [e.folder for e in experts], config.experts, plan.architecture,
                                                   (shared[0].folder, config.shared_experts[0]) if shared and config.shared_experts
                                                   else None, shared_tensors_merged=bool(config.shared_method))
            if routing is not None:
                result.routing = {name: stats["routing_accuracy"] for name, stats in routing["sets"].items()}
            report = {"architecture": plan.architecture.name, "experts": len(experts), "experts_per_token": config.experts_per_token,
                      "gate_mode": config.gate_mode, "shared_method": config.shared_method,
                      "total_parameters": result.total_parameters, "active_parameters": result.active_parameters,
                      "self_tests": result.self_tests, "calibration": result.calibration, "routing_accuracy": result.routing}
            (temp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise output_error(exc, Path(exc.filename) if exc.filename else out_dir) from None
    finally:
        for checkpoint in opened:
            checkpoint.close()
    return result


@dataclass(frozen=True)
class _Slot:
    """One set of MLP weights in the MoE: an expert, or the shared expert."""

    checkpoint: Checkpoint
    expert: MoEExpert
    name: Callable[..., str]  # (layer, projection) -> its tensor in the MoE (per-expert layout)
    generator: torch.Generator  # its noise_scale noise

    def read(self, name: str) -> torch.Tensor:
        return _expert_tensor(self.checkpoint, name, self.expert, self.generator)


@dataclass(frozen=True)
class _Output:
    """One tensor of the MoE, and how to make it (read, merged, stacked or generated) when its turn comes."""

    tensor: OutputTensor
    make: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class _Plan:
    """What the MoE holds, in writing order, and where each tensor comes from."""

    architecture: MoEArchitecture
    outputs: list[_Output]
    dtype: str
    per_expert: int  # parameters of one expert's MLPs, all layers

    @property
    def bytes(self) -> int:
        return sum(o.tensor.nbytes for o in self.outputs)

    @property
    def parameters(self) -> int:
        return sum(o.tensor.numel for o in self.outputs)


def _plan(config: MoEConfig, base: Checkpoint, experts: list[Checkpoint], shared: list[Checkpoint], seed: int, fused: bool,
          progress: Callable[[str], None]) -> _Plan:
    from mergeforge.moe.gates import gate_vectors

    assert base.config is not None
    shared_configs = config.shared_experts or []
    architecture = choose_architecture(config.architecture, str(base.config.get("model_type")), len(shared_configs), "moe config")
    architecture = architecture.fused() if fused else architecture
    mlp = _check_compatible(base, experts, all_tensors=bool(config.shared_method))
    _check_compatible(base, shared)
    layers = int(base.config["num_hidden_layers"])
    hidden = int(base.config["hidden_size"])
    dtype = parse_recipe_dtype(config.dtype, "moe config: field 'dtype'") or _dtype_of(base)
    progress(f"router rows: gate mode '{config.gate_mode}', {len(experts)} experts, {layers} layers")
    routers = gate_vectors(config, config.experts, base.folder, layers, hidden, seed)
    # The shared expert's sigmoid gate: its prompts' rows (hidden states, as mergekit; for a
    # calibrated MoE too), or random rows.
    shared_gate_mode = "hidden" if config.gate_mode == "calibrated" else config.gate_mode
    shared_gates = (gate_vectors(config.model_copy(update={"gate_mode": shared_gate_mode}), shared_configs, base.folder, layers,
                                 hidden, seed + 1) if shared_configs else None)
    generators = [torch.Generator().manual_seed(seed * 1000 + 1 + i) for i in range(len(experts) + len(shared))]
    routed = [_Slot(c, e, architecture.expert_slot(i), g) for i, (c, e, g) in enumerate(zip(experts, config.experts, generators))]
    shared_slots = [_Slot(c, e, architecture.shared_tensor, g) for c, e, g in zip(shared, shared_configs, generators[len(experts):])]
    merger = _shared_merger(config, experts, seed)

    def floating(name: str) -> str:
        return dtype if _floating(base.info(name).dtype) else base.info(name).dtype

    outputs: list[_Output] = []
    for name in base.names():
        match = MLP_TENSOR.match(name)
        if match is None:
            make = partial(_merged, merger, base, name) if merger and _floating(base.info(name).dtype) else partial(base.read, name)
            outputs.append(_Output(OutputTensor(name, base.info(name).shape, floating(name)), make))
            continue
        layer, projection = int(match.group(1)), match.group(2)
        shape = tuple(base.info(name).shape)
        if not fused:
            outputs += [_Output(OutputTensor(slot.name(layer, projection), shape, dtype), partial(slot.read, name)) for slot in routed]
        elif projection == "gate_proj":  # [experts, 2·I, H]: each expert's gate rows, then its up rows
            up = name.replace("gate_proj", "up_proj")
            outputs.append(_Output(OutputTensor(architecture.FUSED_GATE_UP.format(layer=layer), (len(routed), 2 * shape[0], shape[1]), dtype),
                                   partial(_stacked, routed, name, up)))
        elif projection == "down_proj":
            outputs.append(_Output(OutputTensor(architecture.FUSED_DOWN.format(layer=layer), (len(routed), *shape), dtype),
                                   partial(_stacked, routed, name)))
        outputs += [_Output(OutputTensor(slot.name(layer, projection), shape, dtype), partial(slot.read, name)) for slot in shared_slots]
        if projection == "gate_proj":
            outputs.append(_Output(OutputTensor(architecture.router_tensor(layer), (len(experts), hidden), dtype),
                                   partial(routers.__getitem__, layer)))
            if architecture.shared_gate_name is not None:
                assert shared_gates is not None
                outputs.append(_Output(OutputTensor(architecture.shared_gate_name.format(layer=layer), (1, hidden), dtype),
                                       partial(shared_gates.__getitem__, layer)))
    outputs += [_Output(OutputTensor(name, shape, dtype), partial(torch.zeros, shape)) for name, shape in _missing_biases(base, architecture).items()]
    return _Plan(architecture, outputs, dtype, sum(base.info(n).numel for n in mlp))


def _merged(merger: Callable[[str, torch.Tensor], torch.Tensor], base: Checkpoint, name: str) -> torch.Tensor:
    return merger(name, base.read(name))


def _stacked(slots: list[_Slot], *names: str) -> torch.Tensor:
    """The fused tensor of ``slots``' ``names`` (each slot's tensors concatenated by rows, in
    order), stacked over the slots: ``[slots, rows, columns]``."""
    return torch.stack([torch.cat([slot.read(name).float() for name in names]) for slot in slots])


def _write_files(temp: Path, base: Checkpoint, config: MoEConfig, plan: _Plan, copy_tokenizer: bool, recipe_text: str | None) -> None:
    """config.json, the tokenizer and other base files, the recipe and the model card."""
    assert base.config is not None
    moe_config = plan.architecture.output_config(base.config, len(config.experts), config.experts_per_token,
                                                 str(to_torch(plan.dtype)).removeprefix("torch."))
    folder_files.carry_over_files(base.folder, temp, base.folder if copy_tokenizer else None)  # not config.json
    (temp / "config.json").write_text(json.dumps(moe_config, indent=2, sort_keys=True) + "\n")
    text = recipe_text if recipe_text is not None else config.to_yaml()
    (temp / CONFIG_FILE).write_text(text, encoding="utf-8")
    folder_files.write_model_card(temp, config.all_models, f"moe ({plan.architecture.name}, gate mode {config.gate_mode})", text)


def _fit_and_route(folder: Path, base_folder: Path, config: MoEConfig, architecture: MoEArchitecture,
                   progress: Callable[[str], None]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Load the MoE written in ``folder`` once: with ``gate_mode: calibrated``, fit its routers and
    write them in place of the placeholders; where the experts have prompts, route them (and the
    held-out prompts) for the routing report. Returns (calibration report, routing report)."""
    positive = [list(e.positive_prompts or []) for e in config.experts]
    held_out = [list(e.held_out_prompts or []) for e in config.experts]
    if not all(positive) and not all(held_out):
        return None, None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeforge.moe.report import routing_report, write_routing_report
    from mergeforge.moe.router import calibrate_routers

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_folder, local_files_only=True)
    calibration = None
    if config.gate_mode == "calibrated":
        progress("calibrating the routers on the MoE's own router inputs, layer by layer")
        rows, calibration = calibrate_routers(model, tokenizer, positive)
        _overwrite_tensors(folder, {architecture.router_tensor(layer): rows[layer] for layer in range(len(rows))})
    progress("routing report: the experts' prompts through the routers")
    names = [e.source_model for e in config.experts]
    report = routing_report(model, tokenizer, {"calibration": positive, "held-out": held_out}, config.experts_per_token, names)
    write_routing_report(report, folder)
    return calibration, report


def _overwrite_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` over same-shaped tensors of the safetensors files in ``folder``, in their dtype."""
    with open_checkpoint(folder) as checkpoint:
        for name, tensor in tensors.items():
            info = checkpoint.info(name)
            data = tensor.to(to_torch(info.dtype)).contiguous().view(torch.uint8).numpy().tobytes()
            if len(data) != info.nbytes or not info.in_safetensors:
                raise RuntimeError(f"internal error: tensor '{name}' cannot be rewritten in place")
            with open(info.file, "r+b") as handle:
                handle.seek(info.offset)
                handle.write(data)


def _dtype_of(base: Checkpoint) -> str:
    assert base.config is not None
    name = base.config.get("torch_dtype") or base.config.get("dtype")
    return (parse_recipe_dtype(str(name), f"model '{base.ref}': config.json dtype") if name else None) or "F32"


def _missing_biases(base: Checkpoint, architecture: MoEArchitecture) -> dict[str, tuple[int, ...]]:
    """Attention biases the output architecture has and the base lacks (Qwen2-MoE's q/k/v from a
    Llama base): written as zeros, so every transformers version loads them, not random ones."""
    missing: dict[str, tuple[int, ...]] = {}
    for name in base.names():
        for projection in architecture.attention_biases:
            if name.endswith(f".self_attn.{projection}.weight"):
                bias = name.removesuffix("weight") + "bias"
                if not base.has(bias):
                    missing[bias] = (base.info(name).shape[0],)
    return missing


def _floating(dtype: str) -> bool:
    from mergeforge.dtypes import is_floating

    return is_floating(dtype)


def _write_weights(temp: Path, plan: _Plan, shard_bytes: int, progress: Callable[[str], None]) -> None:
    """Stream every tensor of the plan into the output shards, one at a time."""
    torch_dtype = to_torch(plan.dtype)
    writer = ShardedWriter(temp, [o.tensor for o in plan.outputs], shard_bytes)
    try:
        for output in plan.outputs:
            tensor = output.make()
            writer.write(output.tensor.name, (tensor.to(torch_dtype) if tensor.is_floating_point() else tensor).contiguous())
        progress(f"wrote {len(plan.outputs)} tensors ({from_torch(torch_dtype)})")
    finally:
        writer.close()
    missing = writer.missing()
    if missing:
        raise RuntimeError(f"internal error: the MoE writer never wrote tensor '{missing[0]}'")
