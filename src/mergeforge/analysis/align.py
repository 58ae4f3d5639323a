"""``mergeforge align A B OUT``: model B, permuted into model A's basis, as a Hugging Face folder.

Two networks trained from different initialisations compute with their hidden units in different
orders; averaging them then averages unrelated units, and the midpoint's loss is high (the loss
barrier of linear mode connectivity). Git Re-Basin (Ainsworth et al., arXiv:2209.04836) permutes
one network's units to match the other's first. This module does that for Llama-family decoders:

- the symmetry group comes from ``config.json`` (:mod:`mergeforge.analysis.symmetry`: MLP units,
  KV heads with their query-head groups, query heads within a group, value dimensions within a
  head, and optionally the residual stream; no Q/K dimensions, which RoPE pins);
- the permutation is found by weight matching (:mod:`mergeforge.analysis.matching`, the default)
  or by activation matching on calibration prompts (:mod:`mergeforge.analysis.activations`);
- a self-test runs first (:func:`self_test`): a random legal permutation must leave A's logits
  unchanged, and aligning the permuted copy back to A must recover A exactly;
- B's tensors are permuted in their stored dtype (pure data movement, so the output holds B's
  exact values) and streamed, one tensor at a time, into a temporary folder with B's config,
  tokenizer and other files, a model card and ``alignment_report.json``; with the self-test on,
  the written folder is loaded with transformers and must give B's logits; only then is it
  renamed into place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeforge.analysis.matching import MAX_SWEEPS, Layout, layout_of, match_weights
from mergeforge.analysis.symmetry import (
    DecoderShape,
    ModelPermutation,
    check_tensor_shape,
    decoder_shape,
    permute_state,
    permute_tensor,
    random_permutation,
    tensor_roles,
)
from mergeforge.checkpoint import folder as folder_files
from mergeforge.checkpoint.reader import Checkpoint, open_checkpoint
from mergeforge.checkpoint.writer import OutputTensor, ShardedWriter, output_error
from mergeforge.errors import CheckpointError, MergeforgeError, RecipeError

if TYPE_CHECKING:
    import torch

    from mergeforge.calibration.data import Batch

REPORT_FILE = "alignment_report.json"
MATCH_METHODS = ("weights", "activations")
LOGITS_TOLERANCE = 1e-4  # largest logit error, relative to the largest logit, of a function-preserving permutation
SELF_TEST_SHAPE = (2, 16)  # random token ids for the logits checks
CALIBRATION_MAX_LENGTH = 256
CALIBRATION_BATCH = 16
# config.json's name for each field of DecoderShape, for the message when two models differ.
CONFIG_KEYS = {"model_type": "model_type", "layers": "num_hidden_layers", "hidden": "hidden_size",
               "intermediate": "intermediate_size", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
               "head_dim": "head_dim"}


class AlignmentError(MergeforgeError):
    """The self-test failed, or alignment cannot run on what it was given."""


@dataclass
class AlignResult:
    out_dir: Path
    report: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Inputs


def _open(ref: str | Path) -> Checkpoint:
    checkpoint = open_checkpoint(ref)
    if not isinstance(checkpoint, Checkpoint):
        checkpoint.close()
        raise CheckpointError(f"model '{ref}': align reads Hugging Face model folders; convert the GGUF file first "
                              "(mergeforge convert FILE OUT --out-format hf)")
    return checkpoint


def check_pair(a: Checkpoint, b: Checkpoint) -> DecoderShape:
    """The shared shape of two models that can be aligned; else one error naming the field or tensor."""
    shape = decoder_shape(a.config, a.ref)
    other = decoder_shape(b.config, b.ref)
    for item in fields(DecoderShape):
        if getattr(shape, item.name) != getattr(other, item.name):
            raise CheckpointError(
                f"model '{b.ref}': config.json {CONFIG_KEYS[item.name]} is {getattr(other, item.name)!r}, but model '{a.ref}' has "
                f"{getattr(shape, item.name)!r}; align needs two models of one architecture and size")
    names_b = set(b.names())
    for name in a.names():
        if name not in names_b:
            raise CheckpointError(f"model '{b.ref}': tensor '{name}' is missing (model '{a.ref}' has it)")
        if a.info(name).shape != b.info(name).shape:
            raise CheckpointError(f"tensor '{name}': shape {list(b.info(name).shape)} in model '{b.ref}' but "
                                  f"{list(a.info(name).shape)} in model '{a.ref}'; align needs two models of one size")
        check_tensor_shape(name, a.info(name).shape, shape, a.ref)
    extra = sorted(names_b - set(a.names()))
    if extra:
        raise CheckpointError(f"model '{b.ref}': tensor '{extra[0]}' is not in model '{a.ref}'; align needs the same tensors")
    return shape


def calibration_batches(data: str | Path, tokenizer_folder: Path, samples: int) -> list[Batch]:
    """Batches of calibration prompts from a JSONL file (``text`` or ``prompt`` per line) or a
    task folder (its ``train`` split), tokenised as the evaluator does."""
    from transformers import AutoTokenizer

    from mergeforge.calibration.data import (
        encode_examples,
        make_batches,
        pad_token_id,
        read_jsonl,
        read_task_folder,
    )

    path = Path(data).expanduser()
    if path.is_dir():
        examples = read_task_folder(path, "train", samples)
    elif path.is_file():
        examples = read_jsonl(path, samples)
    else:
        raise RecipeError(f"--data: '{data}' not found; give a JSONL file of prompts or a task folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{tokenizer_folder}: cannot load a tokenizer for the calibration prompts ({exc})") from None
    encoded = encode_examples(tokenizer, examples, CALIBRATION_MAX_LENGTH, prompts_only=True)
    return make_batches(encoded, CALIBRATION_BATCH, pad_token_id(tokenizer))


def _load_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        import torch

        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: transformers cannot load the model ({exc})") from None


def _with_state(model: Any, state: dict[str, torch.Tensor]) -> Any:
    """A copy of ``model`` holding ``state`` (a checkpoint's tensors; tied weights may be absent)."""
    import copy

    clone = copy.deepcopy(model)
    missing, unexpected = clone.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(clone.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise AlignmentError(f"internal error: state dict does not fit the model (missing {missing}, unexpected {unexpected})")
    return clone


# ---------------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True)
class MatchSettings:
    method: str = "weights"
    residual: bool = False
    signs: bool = False
    max_sweeps: int = MAX_SWEEPS
    batches: tuple[Any, ...] = ()  # calibration batches, for activation matching


def find_permutation(settings: MatchSettings, shape: DecoderShape, layout: Layout, read_a: Callable[[str], torch.Tensor],
                     read_b: Callable[[str], torch.Tensor], models: Callable[[], tuple[Any, Any]],
                     progress: Callable[[str], None]) -> tuple[ModelPermutation, dict[str, Any]]:
    """B's permutation by the chosen method, and what the report says of the search. ``models``
    loads both models (only activation matching calls it)."""
    if settings.method == "weights":
        result = match_weights(read_a, read_b, layout, shape, settings.residual, settings.signs, settings.max_sweeps, progress)
        return result.permutation, {"sweeps": result.sweeps, "converged": result.converged}
    from mergeforge.analysis.activations import match_activations

    model_a, model_b = models()
    tokens = sum(int(batch.attention_mask.sum()) for batch in settings.batches)
    return match_activations(model_a, model_b, settings.batches, shape, settings.residual, settings.signs), {"calibration_tokens": tokens}


# ---------------------------------------------------------------------------------------------
# The self-test


def _logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[name].double() - b[name].double()).pow(2).sum()) for name in a))


def self_test(a: Checkpoint, shape: DecoderShape, layout: Layout, settings: MatchSettings, seed: int,
              progress: Callable[[str], None]) -> dict[str, Any]:
    """A random legal permutation of A must leave its logits unchanged, and aligning the permuted
    copy back to A must give A's exact tensors (the identity recovered: zero weight distance and
    a midpoint equal to A, so a zero barrier). Raises :class:`AlignmentError` when either fails."""
    import torch

    state = {name: a.read(name).float() for name in a.names()}
    permutation = random_permutation(shape, seed, residual=settings.residual, signs=settings.signs)
    permuted = permute_state(state, permutation, shape)
    model = _load_model(a.folder)
    permuted_model = _with_state(model, permuted)
    input_ids = torch.randint(0, model.config.vocab_size, SELF_TEST_SHAPE, generator=torch.Generator().manual_seed(seed))
    reference = _logits(model, input_ids)
    logits_error = relative_error(_logits(permuted_model, input_ids), reference)
    if logits_error > LOGITS_TOLERANCE:
        raise AlignmentError(
            f"self-test failed: a random legal permutation changed model '{a.ref}''s logits by {logits_error:.1e} (limit "
            f"{LOGITS_TOLERANCE:g}), so this {shape.model_type} variant has a part align does not model; "
            "--no-self-test skips the check")
    midpoint = {name: (state[name] + permuted[name]) / 2 for name in state}
    midpoint_error_before = relative_error(_logits(_with_state(model, midpoint), input_ids), reference)
    progress(f"self-test: a random permutation keeps the logits (error {logits_error:.1e}); aligning it back")
    found, _ = find_permutation(settings, shape, layout, state.__getitem__, permuted.__getitem__,
                                lambda: (model, permuted_model), lambda line: None)
    realigned = permute_state(permuted, found, shape)
    recovered = all(torch.equal(realigned[name], state[name]) for name in state)
    distance = _distance(state, realigned)
    midpoint = {name: (state[name] + realigned[name]) / 2 for name in state}
    midpoint_error_after = relative_error(_logits(_with_state(model, midpoint), input_ids), reference)
    if not recovered:
        raise AlignmentError(f"self-test failed: {settings.method} matching did not recover a random permutation of model "
                             f"'{a.ref}' (weight distance {distance:.3g} after aligning it back, should be 0); --no-self-test "
                             "skips the check")
    return {"passed": True, "tolerance": LOGITS_TOLERANCE, "permuted_logits_error": logits_error,
            "identity_recovered": recovered, "weight_distance_after_realigning": distance,
            "weight_distance_before_realigning": _distance(state, permuted),
            "midpoint_logits_error_before_realigning": midpoint_error_before,
            "midpoint_logits_error_after_realigning": midpoint_error_after}


def check_output(out: Path, b: Checkpoint, seed: int) -> float:
    """The written folder, loaded with transformers, must give B's logits."""
    import torch

    model_b, aligned = _load_model(b.folder), _load_model(out)
    input_ids = torch.randint(0, model_b.config.vocab_size, SELF_TEST_SHAPE, generator=torch.Generator().manual_seed(seed + 1))
    error = relative_error(_logits(aligned, input_ids), _logits(model_b, input_ids))
    if error > LOGITS_TOLERANCE:
        raise AlignmentError(f"self-test failed: the aligned model's logits differ from model '{b.ref}''s by {error:.1e} "
                             f"(limit {LOGITS_TOLERANCE:g}); nothing was written")
    return error


# ---------------------------------------------------------------------------------------------
# Output


def _part(name: str) -> str:
    """The report's group of a tensor: ``layer N attention``/``mlp``/``norms``, or ``embeddings and head``."""
    layer, _ = tensor_roles(name, name)
    if layer is None:
        return "embeddings and head"
    kind = "attention" if ".self_attn." in name and "_norm." not in name else "mlp" if ".mlp." in name else "norms"
    return f"layer {layer} {kind}"


def write_permuted(a: Checkpoint, b: Checkpoint, permutation: ModelPermutation, shape: DecoderShape, temp: Path) -> dict[str, Any]:
    """Stream B's tensors, permuted, into ``temp``; return the squared distances to A before and
    after, per part, in float64."""
    tensors = [OutputTensor(name, b.info(name).shape, b.info(name).dtype) for name in b.names()]
    writer = ShardedWriter(temp, tensors)
    parts: dict[str, dict[str, float]] = {}
    norm_a = 0.0
    try:
        for tensor in tensors:
            original = b.read(tensor.name)
            permuted = permute_tensor(tensor.name, original, permutation, shape).contiguous()
            writer.write(tensor.name, permuted)
            reference = a.read(tensor.name).double()
            part = parts.setdefault(_part(tensor.name), {"before": 0.0, "after": 0.0})
            part["before"] += float((reference - original.double()).pow(2).sum())
            part["after"] += float((reference - permuted.double()).pow(2).sum())
            norm_a += float(reference.pow(2).sum())
    finally:
        writer.close()
    before, after = (math.sqrt(sum(p[key] for p in parts.values())) for key in ("before", "after"))
    return {"weight_distance": {"before": before, "after": after, "relative_before": before / math.sqrt(norm_a),
                                "relative_after": after / math.sqrt(norm_a)},
            "matching_cost": {"definition": "squared L2 distance between A's and B's tensors of the part (what weight matching "
                                            "minimises), before and after alignment",
                              "parts": parts}}


def _settings_text(a: Checkpoint, b: Checkpoint, settings: MatchSettings, seed: int) -> str:
    return "\n".join([f"reference: {json.dumps(a.ref)}", f"model: {json.dumps(b.ref)}", f"match: {settings.method}",
                      f"residual: {str(settings.residual).lower()}", f"signs: {str(settings.signs).lower()}", f"seed: {seed}"])


def align(reference: str | Path, model: str | Path, out_dir: str | Path, *, match: str = "weights", residual: bool = False,
          signs: bool = False,
          data: str | Path | None = None, samples: int = 256, run_self_test: bool = True, seed: int = 0, overwrite: bool = False,
          copy_tokenizer: bool = True, max_sweeps: int = MAX_SWEEPS,
          progress: Callable[[str], None] = lambda line: None) -> AlignResult:
    """Permute ``model`` (B) to align it with ``reference`` (A) and write it to ``out_dir``.

    Arguments:
        reference, model: Hugging Face folders of one Llama-family architecture and size.
        match: ``weights`` (weight matching, no data) or ``activations`` (needs ``data``).
        residual: also permute the residual stream (every layer's input/output dimension).
        signs: also flip the sign of units where that is exact (residual dimensions, MLP units
            through up/down, value dimensions), choosing each sign by the same matching.
        data: calibration prompts for activation matching: a JSONL file or a task folder.
        samples: how many calibration examples to read.
        run_self_test: run the self-test and check the written folder's logits against B's.
        seed: the self-test's random permutation and token ids.

    Returns:
        The output folder and the report (also written as ``alignment_report.json``).

    Example:
        >>> align("zoo/models/scratch_shift_a", "zoo/models/scratch_shift_b", "aligned_b/").report["weight_distance"]
    """
    if match not in MATCH_METHODS:
        raise RecipeError(f"--match: unknown method '{match}'; use {' or '.join(MATCH_METHODS)}")
    if match == "activations" and data is None:
        raise RecipeError("--match activations needs --data: a JSONL file of prompts or a task folder")
    out_path = Path(out_dir)
    try:
        with ExitStack() as opened:
            a = opened.enter_context(_open(reference))
            b = opened.enter_context(_open(model))
            settings = MatchSettings(match, residual, signs, max_sweeps)
            return _align_opened(a, b, out_path, settings, data, samples, run_self_test, seed, overwrite, copy_tokenizer, progress)
    except OSError as exc:
        raise output_error(exc, Path(exc.filename) if exc.filename else out_path) from None


def _align_opened(a: Checkpoint, b: Checkpoint, out_path: Path, settings: MatchSettings, data: str | Path | None, samples: int,
                  run_self_test: bool, seed: int, overwrite: bool, copy_tokenizer: bool,
                  progress: Callable[[str], None]) -> AlignResult:
    shape = check_pair(a, b)
    folder_files.check_output_location(out_path, [a.location, b.location], overwrite)
    layout = layout_of(a.names(), shape)
    if settings.method == "activations" and data is not None:
        settings = replace(settings, batches=tuple(calibration_batches(data, a.folder, samples)))
    report: dict[str, Any] = {"reference": a.ref, "model": b.ref, "architecture": shape.model_type,
                              "symmetry": {"sizes": shape.sizes(), "residual": settings.residual, "signs": settings.signs,
                                           "query_key_dims": "not permuted (RoPE pins them)"},
                              "match": settings.method}
    if run_self_test:
        report["self_test"] = self_test(a, shape, layout, settings, seed, progress)
    progress(f"{settings.method} matching of '{b.ref}' to '{a.ref}'")
    permutation, report["search"] = find_permutation(
        settings, shape, layout, lambda name: a.read(name).float(), lambda name: b.read(name).float(),
        lambda: (_load_model(a.folder), _load_model(b.folder)), progress)
    with folder_files.atomic_output_folder(out_path) as temp:
        report.update(write_permuted(a, b, permutation, shape, temp))
        folder_files.carry_over_files(b.folder, temp, b.folder if copy_tokenizer else None)
        folder_files.write_config(b.config, temp, None, None)
        folder_files.write_model_card(temp, [a.ref, b.ref], "align", _settings_text(a, b, settings, seed),
                                      title=f"{Path(b.ref).name} aligned to {Path(a.ref).name}")
        if run_self_test:
            report["self_test"]["output_logits_error"] = check_output(temp, b, seed)
        report["permutation"] = permutation.as_json()
        (temp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return AlignResult(out_path, report)
