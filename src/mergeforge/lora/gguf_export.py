"""``mergeforge lora convert ADAPTER OUT.gguf``: a PEFT LoRA adapter as llama.cpp's LoRA GGUF, which
``llama-cli -m base.gguf --lora adapter.gguf`` (and ``llama_cpp.Llama(lora_path=...)``) apply at
run time.

The layout follows llama.cpp's ``convert_lora_to_gguf.py`` and its loader (``llama-adapter.cpp``):

- each adapted weight ``W`` (GGUF name ``blk.N.attn_q.weight``, from the same name table the
  model writer uses) becomes ``<name>.lora_a`` = PEFT's ``lora_A`` [r, in] and ``<name>.lora_b`` =
  ``lora_B`` [out, r], in NumPy order, untransposed;
- Llama's Q/K rotary permutation acts on the rows of ``W``, which are the rows of ``lora_B``: it is
  applied to ``lora_B`` alone;
- an embedding LoRA is ``token_embd.weight.lora_a`` = ``lora_embedding_A``ᵀ [vocab, r] and
  ``.lora_b`` = ``lora_embedding_B`` [dim, r] (llama.cpp gathers rows of ``lora_a``);
- llama.cpp scales every pair by ``adapter.lora.alpha / r``, ``r`` read from ``lora_b``. The file's
  alpha is the config's ``lora_alpha``; a module whose scale differs from ``lora_alpha / r``
  (``alpha_pattern``, rsLoRA's ``alpha / √r``) has the ratio folded into its ``lora_b``, so the
  product llama.cpp adds is exactly PEFT's.

What the format cannot hold is refused, naming the tensor, never dropped: ``modules_to_save``
copies that differ from the base (llama.cpp skips norm tensors in an adapter and rejects others),
and an embedding LoRA on a model whose output layer is its embedding (llama.cpp applies it to the
output layer too, where the shapes do not multiply: llama.cpp 0.3.36 aborts in ``ggml_mul_mat``).
``mergeforge convert BASE+ADAPTER out.gguf`` writes the adapted model instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mergeforge.checkpoint.adapted import AdaptedCheckpoint
from mergeforge.checkpoint.convert import check_output, gguf_output_for, write_gguf_atomically
from mergeforge.checkpoint.gguf_arch import Architecture, to_gguf_order
from mergeforge.checkpoint.gguf_writer import LORA_OUT_TYPES, qk_heads, write_lora_gguf
from mergeforge.checkpoint.lora_adapter import Adapter, ModuleUpdate, read_lora
from mergeforge.checkpoint.peft import resolve_base
from mergeforge.checkpoint.reader import TensorSource, open_checkpoint
from mergeforge.errors import CheckpointError, OutputError

GGUF_ADAPTER_FILE = "adapter.gguf"  # the file written into OUT when OUT is a folder


@dataclass
class LoraGGUFResult:
    """What ``lora convert`` wrote: the file, the alpha in it, the modules, and notes (folded
    scales, skipped identical copies)."""

    path: Path
    alpha: float
    modules: int
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        return [*self.notes, f"wrote {self.path} ({self.modules} LoRA modules, adapter.lora.alpha {self.alpha:g})"]


def file_alpha(adapter: Adapter) -> float:
    """``adapter.lora.alpha``: the config's ``lora_alpha``, as llama.cpp's converter writes it."""
    return float(adapter.config.get("lora_alpha") or 0.0)


def fold_factor(update: ModuleUpdate, alpha: float) -> float:
    """What ``lora_b`` is multiplied by so that llama.cpp's ``alpha / r`` gives PEFT's scale
    (1 for a plain module; llama.cpp uses scale 1 when the alpha is 0)."""
    applied = alpha / update.rank if alpha else 1.0
    return update.scale / applied


def lora_pair(update: ModuleUpdate, hf_name: str, arch: Architecture, heads: int, kv_heads: int,
              alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``(lora_a, lora_b)`` of one module as float32 NumPy in llama.cpp's layout."""
    factor = fold_factor(update, alpha)
    up = update.up.to(torch.float32)
    if not math.isclose(factor, 1.0, rel_tol=1e-12):
        up = up * factor
    lora_b = up.numpy()
    lora_a = update.down.to(torch.float32).numpy()
    if update.embedding:
        return np.ascontiguousarray(lora_a.T), lora_b
    permute = arch.qk_heads(hf_name, heads, kv_heads)
    if permute:
        lora_b = to_gguf_order(lora_b, permute)
    return lora_a, lora_b


def _check_saved(adapter: Adapter, base: TensorSource, ref: str) -> list[str]:
    """modules_to_save copies: identical to the base's (PEFT saves an adapted embedding's own
    weight) they change nothing and are left out; otherwise llama.cpp cannot hold them."""
    notes = []
    for name, tensor in sorted(adapter.saved.items()):
        if torch.equal(tensor.to(torch.float32), base.read(name).to(torch.float32)):
            notes.append(f"note: {name}: saved by the adapter but equal to the base's; left out")
            continue
        raise CheckpointError(
            f"{ref}: tensor '{name}' is saved whole (modules_to_save), which llama.cpp's LoRA GGUF cannot hold "
            "(it skips norms and rejects other tensors); write the adapted model instead: "
            f"mergeforge convert BASE+{adapter.folder} out.gguf")
    return notes


def convert_lora(adapter_ref: str | os.PathLike[str], out: str | os.PathLike[str], base: str | os.PathLike[str] | None = None,
                 out_type: str = "f32", overwrite: bool = False, name: str | None = None) -> LoraGGUFResult:
    """Write the PEFT LoRA folder ``adapter_ref`` as llama.cpp's LoRA GGUF.

    Arguments:
        adapter_ref: the adapter folder.
        out: a ``.gguf`` file, or a folder that gets ``adapter.gguf``.
        base: the model the adapter was trained on (a Hugging Face folder or a GGUF file): its
            config gives the architecture and heads, and every module's shape is checked against
            it. Default: the adapter's ``base_model_name_or_path``, beside the adapter first.
        out_type: ``f32`` (default: adapters are small), ``f16``, ``bf16`` or ``q8_0``.
        name: ``general.name`` (default: the adapter folder's name).

    Example:
        >>> convert_lora("adapter/", "adapter.gguf", base="base/")   # doctest: +SKIP
    """
    if out_type not in LORA_OUT_TYPES:
        raise OutputError(f"--out-type: a LoRA GGUF is {', '.join(LORA_OUT_TYPES)} (as llama.cpp's converter writes it), "
                          f"not '{out_type}'")
    adapter = read_lora(Path(adapter_ref))
    ref = str(adapter_ref)
    base_ref = str(base) if base is not None else str(resolve_base(adapter.folder, adapter.config))
    with open_checkpoint(base_ref) as base_model:
        check_output(Path(out), [adapter.folder, base_model.location], overwrite)
        AdaptedCheckpoint(base_model, adapter, f"{base_ref}+{ref}")  # every module's name and shape, checked
        output = gguf_output_for(base_model)
        heads, kv_heads = qk_heads(output)
        notes = _check_saved(adapter, base_model, ref)
        tied = not base_model.has("lm_head.weight") or not output.arch.untied_output
        alpha = file_alpha(adapter)
        tensors, folded = [], []
        for update in sorted(adapter.updates.values(), key=lambda u: u.name):
            hf_name = f"{update.name}.weight"
            gguf_name = output.arch.gguf_name(hf_name)
            if gguf_name is None:
                raise CheckpointError(f"{ref}: module '{update.name}' has no GGUF name in architecture '{output.arch.name}'")
            if update.embedding and tied:
                raise CheckpointError(
                    f"{ref}: module '{update.name}' is an embedding LoRA on a model whose output layer is its embedding; "
                    "llama.cpp applies it to the output layer too and aborts. Write the adapted model instead: "
                    f"mergeforge convert {base_ref}+{ref} out.gguf")
            lora_a, lora_b = lora_pair(update, hf_name, output.arch, heads, kv_heads, alpha)
            tensors += [(hf_name, f"{gguf_name}.lora_a", lora_a), (hf_name, f"{gguf_name}.lora_b", lora_b)]
            if not math.isclose(fold_factor(update, alpha), 1.0, rel_tol=1e-12):
                folded.append(update.name)
    if folded:
        notes.append(f"note: {len(folded)} modules (e.g. {folded[0]}) have a scale other than lora_alpha/r (alpha_pattern, "
                     "rsLoRA); it is folded into their lora_b, as llama.cpp applies adapter.lora.alpha/r to every module")
    if not tensors:
        raise CheckpointError(f"{ref}: the adapter has no LoRA modules; nothing to write")
    label = name or adapter.folder.name
    written = write_gguf_atomically(Path(out), GGUF_ADAPTER_FILE,
                                    lambda path: write_lora_gguf(path, output.arch, alpha, tensors, out_type, label))
    return LoraGGUFResult(written, alpha, len(tensors) // 2, notes)
