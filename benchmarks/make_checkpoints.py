"""Random-weight, Llama-shaped bf16 checkpoints for the speed benchmark: one base and fine-tunes
that are small perturbations of it, written as real Hugging Face folders (``config.json`` plus
sharded safetensors) that ``transformers`` and mergekit both load.

Weights are drawn with NumPy and rounded to bf16 (round to nearest even) by hand, so making the
3B set does not need torch. Folders are cached: a folder whose ``.complete`` marker matches its
spec is reused.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SHARD_BYTES = 2 * 1000**3


@dataclass(frozen=True)
class LlamaShape:
    """The shape of a Llama-family decoder (the fields of its ``config.json`` that size it)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden_size, self.intermediate_size
        head_dim = h // self.num_attention_heads
        kv = self.num_key_value_heads * head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for layer in range(self.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            shapes[prefix + "input_layernorm.weight"] = (h,)
            shapes[prefix + "self_attn.q_proj.weight"] = (h, h)
            shapes[prefix + "self_attn.k_proj.weight"] = (kv, h)
            shapes[prefix + "self_attn.v_proj.weight"] = (kv, h)
            shapes[prefix + "self_attn.o_proj.weight"] = (h, h)
            shapes[prefix + "post_attention_layernorm.weight"] = (h,)
            shapes[prefix + "mlp.gate_proj.weight"] = (i, h)
            shapes[prefix + "mlp.up_proj.weight"] = (i, h)
            shapes[prefix + "mlp.down_proj.weight"] = (h, i)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(s)) for s in self.tensor_shapes().values())

    def config(self) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


SHAPES: dict[str, LlamaShape] = {
    # 0.22B: the size of the mergekit measurement.
    "0.2B": LlamaShape("0.2B", 32000, 1024, 2816, 12, 16, 16, False),
    # 1.1B: TinyLlama's shape.
    "1B": LlamaShape("1B", 32000, 2048, 5632, 22, 32, 4, False),
    # 3.2B: Llama 3.2 3B's shape (tied embeddings, 128k vocabulary).
    "3B": LlamaShape("3B", 128256, 3072, 8192, 28, 24, 8, True),
}


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even, as torch does."""
    bits = values.astype(np.float32, copy=False).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    position = 0
    for name, array in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [position, position + array.nbytes]}
        position += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for array in tensors.values():
            handle.write(memoryview(np.ascontiguousarray(array)).cast("B"))


def _tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], base_bits: np.ndarray | None, scale: float) -> np.ndarray:
    if base_bits is None:
        if name.endswith("norm.weight"):
            values = 1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)
        else:
            values = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        return to_bf16_bits(values)
    # A fine-tune: the base plus a small dense update (about 10% of the weights' spread).
    values = from_bf16_bits(base_bits)
    values += scale * rng.standard_normal(shape, dtype=np.float32)
    return to_bf16_bits(values)


def make_set(shape: LlamaShape, root: Path, finetunes: int = 3, seed: int = 0) -> list[Path]:
    """Write ``root/base`` and ``root/ft1..ftN`` (skipping complete ones); returns their paths."""
    names = ["base", *(f"ft{i + 1}" for i in range(finetunes))]
    folders = [root / n for n in names]
    spec = json.dumps({"shape": asdict(shape), "seed": seed, "version": 1}, sort_keys=True)
    if all((f / ".complete").is_file() and (f / ".complete").read_text() == spec for f in folders):
        return folders
    started = time.perf_counter()
    shapes = shape.tensor_shapes()
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor_shape in shapes.items():
        nbytes = int(np.prod(tensor_shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".complete").unlink(missing_ok=True)
        (folder / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    weight_map: dict[str, str] = {}
    for shard_index, shard in enumerate(shards):
        file_name = f"model-{shard_index + 1:05d}-of-{len(shards):05d}.safetensors"
        base_tensors: dict[str, np.ndarray] = {}
        for tensor_index, name in enumerate(shard):
            rng = np.random.default_rng([seed, shard_index, tensor_index])
            base_tensors[name] = _tensor(rng, name, shapes[name], None, 0.0)
            weight_map[name] = file_name
        _write_safetensors(folders[0] / file_name, base_tensors)
        for model_index, folder in enumerate(folders[1:], start=1):
            tuned: dict[str, np.ndarray] = {}
            for tensor_index, name in enumerate(shard):
                rng = np.random.default_rng([seed, shard_index, tensor_index, model_index])
                spread = 0.05 if name.endswith("norm.weight") else 0.02
                tuned[name] = _tensor(rng, name, shapes[name], base_tensors[name], 0.1 * spread)
            _write_safetensors(folder / file_name, tuned)
            del tuned
        del base_tensors
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for folder in folders:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (folder / ".complete").write_text(spec)
    print(f"made {shape.name} checkpoints ({shape.parameters / 1e9:.2f}B parameters, {len(folders)} models) "
          f"in {time.perf_counter() - started:.0f} s under {root}", flush=True)
    return folders


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


if __name__ == "__main__":
    import sys

    for size in sys.argv[1:] or ["0.2B"]:
        make_set(SHAPES[size], Path(os.environ.get("BENCH_CACHE", ".cache/bench")) / size)
