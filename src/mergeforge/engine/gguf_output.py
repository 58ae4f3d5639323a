"""GGUF in a merge: ``--out-format gguf`` (the merge is written as safetensors inside the temporary
output folder, then streamed into ``model.gguf`` by the same writer ``mergeforge convert`` uses),
the dry run's list of input tensor types, and the warnings about quantized inputs."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from mergeforge.checkpoint.adapted import AdaptedCheckpoint
from mergeforge.checkpoint.convert import GGUF_FILE
from mergeforge.checkpoint.gguf_reader import FLOAT_TYPES, GGUFCheckpoint
from mergeforge.checkpoint.gguf_writer import GGUFOutput, check_out_type, plan_tensors, write_gguf
from mergeforge.checkpoint.reader import Checkpoint, TensorSource
from mergeforge.checkpoint.safetensors_format import read_json
from mergeforge.dtypes import is_floating, to_f32
from mergeforge.engine.options import MergeOptions
from mergeforge.engine.plan import MergePlan
from mergeforge.errors import OutputError

log = logging.getLogger("mergeforge")

HF_STAGING = ".merged-hf"  # inside the temporary output folder; gone once model.gguf is written
OUT_TYPE_OF_DTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def out_type(plan: MergePlan, options: MergeOptions) -> str:
    """``--out-type``, else the merge's output dtype."""
    if options.out_type:
        return options.out_type
    floating = Counter(job.output.dtype for job in plan.jobs if is_floating(job.output.dtype))
    dtype = floating.most_common(1)[0][0] if floating else "F32"
    return OUT_TYPE_OF_DTYPE.get(dtype, "f32")


def check_gguf_output(plan: MergePlan, options: MergeOptions) -> None:
    """Everything that would stop the GGUF output, found before the merge starts."""
    check_out_type(out_type(plan, options))
    if plan.side_tensors():
        raise OutputError(f"--out-format gguf: '{plan.method.name}' writes per-task side tensors, which a GGUF file cannot "
                          "hold; merge to a Hugging Face folder")
    if not options.copy_tokenizer:
        raise OutputError("--no-copy-tokenizer: a GGUF output needs the tokenizer (llama.cpp refuses a file without one)")
    reference = plan.checkpoints[plan.reference]
    config = dict(reference.config or {})
    if plan.output_layers is not None:
        config["num_hidden_layers"] = len(plan.output_layers)
    output = GGUFOutput(config, metadata_source=reference if isinstance(reference, GGUFCheckpoint) else None,
                        where=f"--out-format gguf (model '{plan.reference}')")
    plan_tensors(output, [(job.output.name, job.output.shape) for job in plan.jobs], out_type(plan, options))


def write_gguf_folder(plan: MergePlan, temp: Path, options: MergeOptions, write_hf: Callable[[Path], None]) -> None:
    """Fill the temporary output folder ``temp`` with ``model.gguf``, the model card and the recipe;
    ``write_hf(folder)`` writes the merge as a Hugging Face folder first."""
    staging = temp / HF_STAGING
    staging.mkdir()
    write_hf(staging)
    reference = plan.checkpoints[plan.reference]
    source = plan.recipe.tokenizer_model()
    tokenizer_model = plan.checkpoints[source] if source is not None else reference
    # A tokenizer with tokens appended exists only as the Hugging Face files in the staging folder.
    appended = plan.vocabulary is not None and bool(plan.vocabulary.additions)
    output = GGUFOutput(
        read_json(staging / "config.json") or {},
        metadata_source=reference if isinstance(reference, GGUFCheckpoint) else None,
        tokenizer_source=tokenizer_model if isinstance(tokenizer_model, GGUFCheckpoint) and not appended else staging,
        name=plan.recipe.name,
        where=f"model '{plan.reference}'",
    )
    with Checkpoint(staging) as merged:
        write_gguf(merged, merged.names(), output, temp / GGUF_FILE, out_type(plan, options))
    for name in ("README.md", "mergeforge_config.yml"):
        if (staging / name).is_file():
            (staging / name).rename(temp / name)
    shutil.rmtree(staging)
    if output.pre_tokenizer_guess:
        log.warning(output.pre_tokenizer_guess)


# -- input types and quantization noise ------------------------------------------------------------


def input_type_lines(plan: MergePlan) -> list[str]:
    """One dry-run line per model: its format and how many tensors of each type it holds."""
    lines = []
    for ref, source in plan.checkpoints.items():
        checkpoint = source.inner if isinstance(source, AdaptedCheckpoint) else source
        if isinstance(checkpoint, GGUFCheckpoint):
            kinds = Counter(checkpoint.gguf_types.values())
            fmt = f"GGUF {checkpoint.arch.name}"
        else:
            kinds = Counter(checkpoint.info(name).dtype for name in checkpoint.names())
            fmt = "safetensors" if isinstance(checkpoint, Checkpoint) else "in memory"
        if isinstance(source, AdaptedCheckpoint):
            fmt += f" + LoRA {source.adapter.folder} ({len(source.adapted_names())} tensors adapted)"
        counts = ", ".join(f"{kind} x{count}" for kind, count in kinds.most_common())
        lines.append(f"input {ref}: {fmt}; tensor types: {counts}")
    return lines


@cache
def expected_noise(kind: str) -> float | None:
    """‖dequant(quant(W)) − W‖ / ‖W‖ of a GGUF type on Gaussian weights (None when the gguf
    package cannot quantize it in Python, e.g. K-quants)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    weights = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    try:
        restored = gguf.quants.dequantize(gguf.quants.quantize(weights, qtype), qtype)
    except (NotImplementedError, gguf.quants.QuantError):
        return None
    return float(np.linalg.norm(restored - weights) / np.linalg.norm(weights))


def _values(checkpoint: TensorSource, name: str) -> np.ndarray:
    """A tensor, flattened, as float64 NumPy (without torch for GGUF and safetensors inputs)."""
    if isinstance(checkpoint, GGUFCheckpoint):
        return checkpoint.read_float32(name).astype(np.float64).reshape(-1)
    if isinstance(checkpoint, Checkpoint) and checkpoint.info(name).in_safetensors:
        info = checkpoint.info(name)
        return to_f32(checkpoint.read_array(name, 0, info.numel), info.dtype).astype(np.float64)
    return np.asarray(checkpoint.read(name).double().numpy()).reshape(-1)


def quantization_warnings(plan: MergePlan, samples: int = 4) -> list[str]:
    """For each quantized GGUF input: its task vector's size (sampled over a few 2-D tensors)
    against the noise its quantization type adds. A quantized fine-tune's task vector is partly
    quantization noise; a quantized base adds that noise to every task vector."""
    base_ref = plan.recipe.base_model
    base = plan.checkpoints.get(base_ref) if base_ref else None
    messages = []
    for ref, checkpoint in plan.checkpoints.items():
        if not isinstance(checkpoint, GGUFCheckpoint):
            continue
        quantized = [n for n, kind in checkpoint.gguf_types.items() if kind not in FLOAT_TYPES and len(checkpoint.tensors[n].shape) == 2]
        if not quantized:
            continue
        kind = Counter(checkpoint.gguf_types[n] for n in quantized).most_common(1)[0][0]
        noise = expected_noise(kind)
        noise_text = (f"{kind} adds about {noise:.2%} relative weight noise" if noise is not None
                      else f"the noise {kind} adds cannot be measured in Python")
        if ref == base_ref:
            messages.append(f"model '{ref}' is quantized ({kind}): {noise_text}, and the base's noise reaches every merged "
                            "tensor; prefer a float (F32/F16/BF16) checkpoint as the base")
            continue
        if base is None:
            messages.append(f"model '{ref}' is quantized ({kind}): {noise_text}, which the merge averages in; prefer a float "
                            "(F32/F16/BF16) checkpoint of it")
            continue
        names = [n for n in quantized if base.has(n) and base.info(n).shape == checkpoint.tensors[n].shape]
        if not names:
            continue
        picked = [names[i] for i in np.linspace(0, len(names) - 1, min(samples, len(names))).astype(int)]
        delta = weight = 0.0
        for name in picked:
            tuned = _values(checkpoint, name)
            original = _values(base, name)
            delta += float(np.sum((tuned - original) ** 2))
            weight += float(np.sum(original**2))
        ratio = (delta / weight) ** 0.5 if weight else 0.0
        verdict = " — the task vector is mostly quantization noise" if noise is not None and ratio < 2 * noise else ""
        messages.append(
            f"model '{ref}' is quantized ({kind}): its task vector is {ratio:.2%} of the base's weight norm "
            f"(over {len(picked)} tensors), and {noise_text}{verdict}; merge a float (F32/F16/BF16) checkpoint of it if you have one"
        )
    return messages
