"""``mergeforge convert``: Hugging Face folder <-> GGUF file, and requantisation, through the same
readers and writers a merge uses. One tensor at a time; the output appears only when complete."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mergeforge.checkpoint import folder as folder_files
from mergeforge.checkpoint.adapted import input_locations
from mergeforge.checkpoint.gguf_reader import GGUFCheckpoint
from mergeforge.checkpoint.gguf_writer import GGUFOutput, check_out_type, write_gguf
from mergeforge.checkpoint.reader import open_checkpoint
from mergeforge.checkpoint.writer import OutputTensor, ShardedWriter
from mergeforge.errors import OutputError

if TYPE_CHECKING:
    from mergeforge.checkpoint.reader import TensorSource

HF_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
GGUF_FILE = "model.gguf"


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed onto it only on success."""
    temp = target.with_name(f".{target.name}{folder_files.TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield temp
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def write_gguf_atomically(out_path: Path, file_name: str, write: Callable[[Path], None]) -> Path:
    """Write one GGUF file so that it appears only when complete: ``out_path`` itself when it ends
    in ``.gguf``, else ``out_path/file_name`` in a folder made for it. Returns the file."""
    if out_path.suffix == ".gguf":
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_path) as temp_file:
            write(temp_file)
        return out_path
    with folder_files.atomic_output_folder(out_path) as temp:
        write(temp / file_name)
    return out_path / file_name


def check_output(out_path: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output (a ``.gguf`` file, else a folder) that is an input, lies inside an input
    folder, or exists without ``overwrite``: inputs are never modified, nor written beside."""
    if out_path.suffix != ".gguf":
        folder_files.check_output_location(out_path, inputs, overwrite)
        return
    for location in inputs:
        if out_path.resolve() == location.resolve():
            raise OutputError(f"{out_path}: is the input file; choose another output")
        if location.is_dir() and location.resolve() in out_path.resolve().parents:
            raise OutputError(f"{out_path}: is inside the input model folder {location}; choose another output")
    if out_path.exists() and not overwrite:
        raise OutputError(f"{out_path}: exists; pass --overwrite to replace it")


def gguf_output_for(checkpoint: TensorSource, name: str | None = None) -> GGUFOutput:
    """The metadata of a GGUF written from ``checkpoint``: copied when it is a GGUF file, else from
    its config.json and tokenizer."""
    if isinstance(checkpoint, GGUFCheckpoint):
        return GGUFOutput(checkpoint.config or {}, metadata_source=checkpoint, name=name, where=checkpoint.ref)
    return GGUFOutput(checkpoint.config or {}, tokenizer_source=checkpoint.folder, name=name, where=checkpoint.ref)


def convert(source: str | os.PathLike[str], out: str | os.PathLike[str], out_format: str = "gguf",
            out_type: str | None = None, overwrite: bool = False, name: str | None = None) -> tuple[Path, list[str]]:
    """Convert a model. ``out_format`` ``gguf``: ``out`` is a ``.gguf`` file, or a folder that gets
    ``model.gguf`` (``out_type`` default f16). ``hf``: ``out`` is a folder of safetensors
    (``out_type`` f32, f16 or bf16; default: each tensor's type as read, float32 for quantized).

    Returns the written path and any warnings.
    """
    out_path = Path(out)
    if out_format not in ("gguf", "hf"):
        raise OutputError(f"--out-format: unknown format '{out_format}'; use hf or gguf")
    if out_format == "hf" and out_type is not None and out_type not in HF_TYPES:
        raise OutputError(f"--out-type: '{out_type}' is not a Hugging Face dtype; use f32, f16 or bf16 (or --out-format gguf)")
    if out_format == "gguf":
        check_out_type(out_type or "f16")
    with open_checkpoint(source) as checkpoint:
        check_output(out_path, input_locations(checkpoint), overwrite)
        if out_format == "hf":
            if out_path.suffix == ".gguf":
                raise OutputError(f"{out_path}: a Hugging Face output is a folder; drop the .gguf suffix or use --out-format gguf")
            with folder_files.atomic_output_folder(out_path) as temp:
                _write_hf(checkpoint, temp, HF_TYPES.get(out_type or ""))
            return out_path, []
        output = gguf_output_for(checkpoint, name)
        names = checkpoint.names()
        written = write_gguf_atomically(out_path, GGUF_FILE, lambda path: write_gguf(checkpoint, names, output, path, out_type or "f16"))
        return written, [output.pre_tokenizer_guess] if output.pre_tokenizer_guess else []


def _write_hf(checkpoint: TensorSource, temp: Path, dtype: str | None) -> None:
    import torch

    from mergeforge.dtypes import to_torch

    tensors = [OutputTensor(n, checkpoint.info(n).shape, dtype or checkpoint.info(n).dtype) for n in checkpoint.names()]
    writer = ShardedWriter(temp, tensors)
    try:
        for tensor in tensors:
            value: torch.Tensor = checkpoint.read(tensor.name)
            writer.write(tensor.name, value.to(to_torch(tensor.dtype)))
    finally:
        writer.close()
    folder = checkpoint.folder
    folder_files.carry_over_files(folder, temp, folder)
    floating = {t.dtype for t in tensors}
    folder_files.write_config(checkpoint.config, temp, dtype or ("F32" if "F32" in floating else next(iter(floating), None)), None)
