"""Writing GGUF files that llama.cpp loads, one tensor at a time, with the ``gguf`` package.

Every tensor's GGUF type and byte size is fixed before the first byte is written (header,
metadata, tensor infos), then tensors are read from the source, converted to llama.cpp's layout
(names, Q/K permutation, Gemma's norm offset), quantized with ``gguf.quants.quantize`` (bit-identical
to ggml for F16, BF16, Q8_0, Q4_0/1 and Q5_0/1) and appended, so memory holds one tensor at a time.

As llama.cpp's converter does, 1-D tensors (norms, biases) stay F32, and a 2-D tensor whose rows
are not a whole number of quantization blocks falls back to F16. K-quants and i-quants are made by
llama.cpp's ``llama-quantize`` from a BF16 file, when it is on PATH.

Metadata comes from a GGUF source when there is one (every ``<arch>.*`` and ``tokenizer.*`` key
copied), else from ``config.json`` (:func:`~mergeforge.checkpoint.gguf_arch.arch_metadata`) and the
Hugging Face tokenizer (``gguf.vocab``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergeforge.checkpoint.gguf_arch import (
    Architecture,
    arch_metadata,
    architecture_of_config,
    to_gguf_order,
)
from mergeforge.checkpoint.gguf_reader import GGUFCheckpoint, field_value
from mergeforge.errors import CheckpointError, OutputError

if TYPE_CHECKING:
    import gguf

    from mergeforge.checkpoint.reader import TensorSource

# --out-type values the gguf package quantizes in Python
PYTHON_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# --out-type values made by llama-quantize (its type names, upper-cased)
LLAMA_QUANTIZE_TYPES = (
    "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
    "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq3_m", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0",
)
OUT_TYPES = PYTHON_TYPES + LLAMA_QUANTIZE_TYPES
# --out-type values of a LoRA adapter GGUF: those llama.cpp's convert_lora_to_gguf.py writes
LORA_OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
# Keys never copied from a source GGUF: they describe that file, not the model.
NOT_COPIED = ("GGUF.", "general.file_type", "general.quantization_version", "general.alignment", "split.", "general.architecture")


def check_out_type(out_type: str) -> None:
    """Refuse an unknown type, or a llama-quantize type without llama-quantize, before any work."""
    if out_type not in OUT_TYPES:
        raise OutputError(f"--out-type: unknown GGUF type '{out_type}'; use one of {', '.join(OUT_TYPES)}")
    if out_type in LLAMA_QUANTIZE_TYPES and shutil.which("llama-quantize") is None:
        raise OutputError(
            f"--out-type {out_type}: K-quants and i-quants are made by llama.cpp's llama-quantize, which is not on PATH; "
            "install llama.cpp (https://github.com/ggml-org/llama.cpp: a release build, `brew install llama.cpp`, or "
            "`cmake -B build && cmake --build build --target llama-quantize`), or choose one of "
            + ", ".join(PYTHON_TYPES)
        )


def _ggml_type(out_type: str) -> gguf.GGMLQuantizationType:
    import gguf

    return gguf.GGMLQuantizationType[out_type.upper()]


def _file_type(out_type: str) -> int:
    import gguf

    return int(gguf.LlamaFileType["ALL_F32" if out_type == "f32" else f"MOSTLY_{out_type.upper()}"])


@dataclass(frozen=True)
class _Planned:
    hf_name: str | None  # None: a tensor copied from the GGUF source as stored (rope_freqs); else quantized from float32
    gguf_name: str
    shape: tuple[int, ...]  # NumPy order (HF)
    kind: gguf.GGMLQuantizationType
    nbytes: int


class GGUFOutput:
    """What a GGUF output holds besides the tensors: architecture, metadata sources, name.

    Arguments:
        config: the output's ``config.json`` (architecture, and the metadata when no GGUF source).
        metadata_source: a GGUF file whose ``<arch>.*`` keys (and tokenizer, unless
            ``tokenizer_source`` is given) are copied.
        tokenizer_source: where ``tokenizer.*`` comes from: a GGUF file, or a Hugging Face folder.
        name: ``general.name``.
    """

    def __init__(self, config: dict[str, Any], metadata_source: GGUFCheckpoint | None = None,
                 tokenizer_source: GGUFCheckpoint | Path | None = None, name: str | None = None, where: str = "output"):
        self.config = config
        self.metadata_source = metadata_source
        self.tokenizer_source = tokenizer_source if tokenizer_source is not None else metadata_source
        self.name = name
        self.where = where
        self.arch: Architecture = metadata_source.arch if metadata_source is not None else architecture_of_config(config, where)
        self.pre_tokenizer_guess: str | None = None


def plan_tensors(output: GGUFOutput, tensors: list[tuple[str, tuple[int, ...]]], out_type: str) -> list[_Planned]:
    """Each output tensor's GGUF name, type and size; an unmappable name is an error, raised
    before anything is written."""
    wanted = _ggml_type(out_type if out_type in PYTHON_TYPES else "bf16")  # llama-quantize starts from BF16
    planned = []
    for name, shape in tensors:
        gguf_name = output.arch.gguf_name(name)
        if gguf_name is None and name == "lm_head.weight" and not output.arch.untied_output:
            continue  # tied to token_embd by the architecture
        if gguf_name is None:
            raise CheckpointError(f"{output.where}: tensor '{name}' has no GGUF name in architecture '{output.arch.name}'")
        planned.append(_plan_one(name, gguf_name, shape, wanted))
    config = output.config
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int):
        written = {item.gguf_name for item in planned}
        tied = bool(config.get("tie_word_embeddings", True))
        missing = [name for name in output.arch.required(layers, tied) if name not in written]
        if missing:
            hf = output.arch.hf_name(missing[0])
            raise CheckpointError(f"{output.where}: the GGUF output would lack tensor '{missing[0]}' ('{hf}'), which llama.cpp "
                                  "needs to load the model")
    source = output.metadata_source
    if source is not None:
        for gguf_name in ("rope_freqs.weight",):
            raw = source.raw_tensor(gguf_name)
            if raw is not None:
                shape = tuple(reversed([int(d) for d in raw.shape]))
                planned.append(_Planned(None, gguf_name, shape, raw.tensor_type, int(raw.n_bytes)))
    return planned


def _plan_one(hf_name: str | None, gguf_name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> _Planned:
    """One tensor's GGUF type, as llama.cpp's converter picks it: 1-D tensors (norms, biases) stay
    F32, and a 2-D tensor whose rows are not a whole number of blocks falls back to F16."""
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    kind = wanted
    if len(shape) < 2:
        kind = gguf.GGMLQuantizationType.F32
    elif shape[-1] % block:
        kind = gguf.GGMLQuantizationType.F16
    return _Planned(hf_name, gguf_name, shape, kind, _nbytes(shape, kind))


def _nbytes(shape: tuple[int, ...], kind: gguf.GGMLQuantizationType) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def _gguf_values(source: TensorSource, name: str, arch: Architecture, heads: int, kv_heads: int) -> np.ndarray:
    """A tensor of ``source`` as float32 in llama.cpp's layout."""
    if isinstance(source, GGUFCheckpoint):
        values = source.read_float32(name)
    else:
        import torch

        values = source.read(name).to(torch.float32).numpy()
    permute = arch.qk_heads(name, heads, kv_heads)
    if permute:
        values = to_gguf_order(values, permute)
    if arch.norm_offset and arch.is_norm(name):
        values = values + np.float32(arch.norm_offset)
    return values


def write_gguf(source: TensorSource, names: list[str], output: GGUFOutput, path: Path, out_type: str) -> None:
    """Write tensors ``names`` of ``source`` (Hugging Face names) to the GGUF file ``path``.

    ``path``'s folder must be the caller's temporary output folder: the file is complete only
    when this returns. K-quant types go through llama-quantize.
    """
    check_out_type(out_type)
    if out_type in LLAMA_QUANTIZE_TYPES:
        staging = path.with_name(path.stem + ".bf16.gguf")
        write_gguf(source, names, output, staging, "bf16")
        try:
            _llama_quantize(staging, path, out_type)
        finally:
            staging.unlink(missing_ok=True)
        return
    planned = plan_tensors(output, [(n, source.info(n).shape) for n in names], out_type)
    heads, kv_heads = qk_heads(output)

    def values(item: _Planned) -> np.ndarray:
        if item.hf_name is None:
            assert output.metadata_source is not None
            return np.array(output.metadata_source.raw_tensor(item.gguf_name).data)
        return _gguf_values(source, item.hf_name, output.arch, heads, kv_heads)

    _write_file(path, output.arch, lambda writer: _add_metadata(writer, output, out_type), planned, values)


def qk_heads(output: GGUFOutput) -> tuple[int, int]:
    """Query and key/value heads of the output's config: what the Q/K permutation needs."""
    heads = int(output.config.get("num_attention_heads") or 0)
    kv_heads = int(output.config.get("num_key_value_heads") or heads)
    if output.arch.permute_qk and not heads:
        raise CheckpointError(f"{output.where}: config.json has no num_attention_heads, which the Q/K permutation needs")
    return heads, kv_heads


def _write_file(path: Path, arch: Architecture, add_metadata: Callable[[gguf.GGUFWriter], None], planned: list[_Planned],
                values: Callable[[_Planned], np.ndarray]) -> None:
    """Header, metadata and tensor table, then every tensor in plan order, each made by
    ``values`` (float32 in llama.cpp's layout, or the raw bytes of a tensor copied as stored)
    only when it is written; the file is on disk when this returns."""
    import gguf

    writer = gguf.GGUFWriter(path, arch.name, use_temp_file=False)
    try:
        try:
            _write_tensors(writer, path, add_metadata, planned, values)
        finally:
            writer.close()
        with open(path, "rb+") as handle:  # on disk before the caller renames it into place
            os.fsync(handle.fileno())
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror}") from None


def _write_tensors(writer: gguf.GGUFWriter, path: Path, add_metadata: Callable[[gguf.GGUFWriter], None],
                   planned: list[_Planned], values: Callable[[_Planned], np.ndarray]) -> None:
    import gguf

    add_metadata(writer)
    for item in planned:
        if _is_quantized(item.kind):
            writer.add_tensor_info(item.gguf_name, gguf.quants.quant_shape_to_byte_shape(item.shape, item.kind),
                                   np.dtype(np.uint8), item.nbytes, raw_dtype=item.kind)
        else:
            dtype = np.float16 if item.kind == gguf.GGMLQuantizationType.F16 else np.float32
            writer.add_tensor_info(item.gguf_name, item.shape, np.dtype(dtype), item.nbytes)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for item in planned:
        data = values(item)
        writer.write_tensor_data(data if item.hf_name is None else gguf.quants.quantize(data, item.kind))


def write_lora_gguf(path: Path, arch: Architecture, alpha: float, tensors: list[tuple[str, str, np.ndarray]], out_type: str,
                    name: str) -> None:
    """Write llama.cpp's LoRA adapter file (what ``llama-cli --lora`` and
    ``Llama(lora_path=...)`` load): ``general.type = adapter``, ``adapter.type = lora``,
    ``adapter.lora.alpha``, and ``tensors`` as ``(hf_name, gguf_name, float32 array in llama.cpp's
    layout)``, typed as llama.cpp's converter types them. llama.cpp scales each pair by
    ``alpha / rank``, the rank read from ``lora_b``.
    """
    import gguf

    if out_type not in LORA_OUT_TYPES:
        raise OutputError(f"--out-type: a LoRA GGUF is {', '.join(LORA_OUT_TYPES)} (as llama.cpp's converter writes it), "
                          f"not '{out_type}'")
    wanted = _ggml_type(out_type)
    planned = [_plan_one(hf_name, gguf_name, tuple(array.shape), wanted) for hf_name, gguf_name, array in tensors]
    arrays = {gguf_name: array for _, gguf_name, array in tensors}

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(name)
        writer.add_file_type(_file_type(out_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    _write_file(path, arch, add_metadata, planned, lambda item: arrays[item.gguf_name])


def _is_quantized(kind: gguf.GGMLQuantizationType) -> bool:
    return kind.name not in ("F32", "F16")


def _llama_quantize(staging: Path, path: Path, out_type: str) -> None:
    command = ["llama-quantize", str(staging), str(path), out_type.upper()]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise OutputError(f"llama-quantize failed on {staging.name} ({out_type}): {' / '.join(tail)}")


# -- metadata ------------------------------------------------------------------------------------


def _add_metadata(writer: gguf.GGUFWriter, output: GGUFOutput, out_type: str) -> None:
    import gguf

    arch = output.arch.name
    source = output.metadata_source
    if source is not None:
        depth = f"{arch}.block_count"
        renamed = "general.name" if output.name else None
        _copy_fields(writer, source, lambda key: not key.startswith("tokenizer.") and key not in (depth, renamed))
        layers = output.config.get("num_hidden_layers", field_value(source.reader, depth))
        writer.add_uint32(depth, int(layers))  # from the output's config: slices change the depth
    else:
        for key, value in arch_metadata(output.arch, output.config, output.where).items():
            _add_typed(writer, key, value)
    if output.name:
        writer.add_name(output.name)
    elif source is None:
        writer.add_name(str(output.config.get("_name_or_path") or "merged model"))
    writer.add_file_type(_file_type(out_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer = output.tokenizer_source
    if isinstance(tokenizer, GGUFCheckpoint):
        _copy_fields(writer, tokenizer, lambda key: key.startswith("tokenizer."))
    elif tokenizer is not None:
        output.pre_tokenizer_guess = add_hf_tokenizer(writer, tokenizer, output.where)


def _copy_fields(writer: gguf.GGUFWriter, source: GGUFCheckpoint, keep: Callable[[str], bool]) -> None:
    import gguf

    for key, field in source.reader.fields.items():
        if key.startswith(NOT_COPIED) or not keep(key) or key in writer.kv_data[0]:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)


def _add_typed(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


# llama.cpp's pre-tokenizer names, recognised from tokenizer.json's pre_tokenizer: a fingerprint
# of its structure (see docs/gguf.md). Unrecognised BPE pre-tokenizers are written as "default".
_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
_QWEN2_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json`` (None: unknown)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds[:1] == ["Split"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if pattern.startswith(_LLAMA3_SPLIT):
            return "llama-bpe"
        if pattern.startswith(_QWEN2_SPLIT):
            return "qwen2"
    return None


def add_hf_tokenizer(writer: gguf.GGUFWriter, folder: Path, where: str) -> str | None:
    """``tokenizer.*`` from a Hugging Face tokenizer folder. Returns a warning when the
    pre-tokenizer is not recognised (llama.cpp then tokenizes with its default)."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json; GGUF needs the tokenizer (pass a folder with a fast tokenizer)")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model_type = (tokenizer_json.get("model") or {}).get("type")
    warning = None
    vocab: Any
    try:
        if model_type == "BPE" and not tokenizer_json["model"].get("byte_fallback"):
            vocab = BpeVocab(folder)
            pre = pre_tokenizer_name(tokenizer_json)
            if pre is None:
                warning = (f"{where}: the tokenizer's pre-tokenizer is not one mergeforge recognises; written as 'default', "
                           "so llama.cpp may split text differently from transformers")
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre or "default")
        elif model_type == "BPE":
            vocab = LlamaHfVocab(folder)  # SentencePiece-style BPE with byte fallback (Llama 2, Mistral)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
        else:
            raise CheckpointError(f"{path}: a {model_type} tokenizer cannot be written as GGUF (byte-level BPE and "
                                  "SentencePiece-style BPE can)")
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read the tokenizer for GGUF ({exc})") from None
    special_ids = _special_ids(tokenizer_json)
    tokens, scores, types = [], [], []
    for index, (text, score, kind) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.CONTROL if index in special_ids and kind == gguf.TokenType.NORMAL else kind)
    writer.add_token_list(tokens)
    if model_type == "BPE" and tokenizer_json["model"].get("byte_fallback"):
        writer.add_token_scores(scores)  # SentencePiece-style merges rank by score; byte-level BPE has none
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return warning


def _special_ids(tokenizer_json: dict[str, Any]) -> set[int]:
    return {int(token["id"]) for token in tokenizer_json.get("added_tokens") or [] if token.get("special")}

