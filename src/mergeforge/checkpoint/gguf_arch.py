"""What differs between llama.cpp's GGUF layout and Hugging Face's, per architecture: tensor
names, llama's Q/K rotary permutation, Gemma's norm offset, and the ``<arch>.*`` metadata keys
that llama.cpp reads from a ``config.json``. One table, read in both directions (GGUF -> HF on
read, HF -> GGUF on write). Torch-free and gguf-free.

Facts from llama.cpp's ``convert_hf_to_gguf.py`` and ``gguf.TensorNameMap`` (the tests check this
table against the latter), and from transformers' GGUF loader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mergeforge.errors import CheckpointError

# Per-block tensors shared by every architecture here: GGUF stem -> Hugging Face module.
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF tensors with no Hugging Face counterpart: derived from the config, carried from a GGUF source.
NON_HF_TENSORS = ("rope_freqs.weight",)


@dataclass(frozen=True)
class Architecture:
    """One llama.cpp architecture and the Hugging Face model types it holds."""

    name: str  # general.architecture
    model_types: tuple[str, ...]  # config.json model_type values written as this architecture
    block: dict[str, str]  # GGUF block stem -> HF module inside model.layers.N
    permute_qk: bool = False  # llama.cpp's adjacent-pair RoPE: q/k rows permuted per head
    norm_offset: float = 0.0  # GGUF norm weight = HF weight + offset (Gemma stores 1 + w)
    extra_keys: dict[str, str] = field(default_factory=dict)  # <arch>.<key> -> config attribute
    biases: tuple[str, ...] = ()  # block stems whose bias llama.cpp requires
    untied_output: bool = True  # False: llama.cpp always ties the output to token_embd (Gemma); lm_head is dropped

    def required(self, layers: int, tied: bool) -> list[str]:
        """The GGUF tensors llama.cpp refuses to load without."""
        names = ["token_embd.weight", "output_norm.weight"] + ([] if tied or not self.untied_output else ["output.weight"])
        for layer in range(layers):
            names += [f"blk.{layer}.{stem}.weight" for stem in self.block]
            names += [f"blk.{layer}.{stem}.bias" for stem in self.biases]
        return names

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a GGUF tensor, or None when this table does not know it."""
        stem, dot, suffix = gguf_name.rpartition(".")
        if not dot or suffix not in ("weight", "bias"):
            return None
        if stem in _GLOBAL:
            return f"{_GLOBAL[stem]}.{suffix}"
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
        if match and match.group(2) in self.block:
            return f"model.layers.{match.group(1)}.{self.block[match.group(2)]}.{suffix}"
        return None

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of a Hugging Face tensor, or None when this table does not know it."""
        stem, dot, suffix = hf_name.rpartition(".")
        if not dot or suffix not in ("weight", "bias"):
            return None
        for gguf_stem, hf_stem in _GLOBAL.items():
            if stem == hf_stem and (gguf_stem != "output" or self.untied_output):
                return f"{gguf_stem}.{suffix}"
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
        if match:
            for gguf_stem, module in self.block.items():
                if match.group(2) == module:
                    return f"blk.{match.group(1)}.{gguf_stem}.{suffix}"
        return None

    def is_norm(self, hf_name: str) -> bool:
        return hf_name.endswith("norm.weight")

    def qk_heads(self, hf_name: str, heads: int, kv_heads: int) -> int | None:
        """Heads of the permuted rows of ``hf_name`` (None when it is not permuted)."""
        if not self.permute_qk:
            return None
        if hf_name.endswith("self_attn.q_proj.weight") or hf_name.endswith("self_attn.q_proj.bias"):
            return heads
        if hf_name.endswith("self_attn.k_proj.weight") or hf_name.endswith("self_attn.k_proj.bias"):
            return kv_heads
        return None


_LLAMA_BLOCK = {**_BLOCK, "ffn_norm": "post_attention_layernorm"}
ARCHITECTURES = {
    arch.name: arch
    for arch in (
        Architecture("llama", ("llama", "mistral"), _LLAMA_BLOCK, permute_qk=True),
        Architecture("qwen2", ("qwen2",), _LLAMA_BLOCK, biases=("attn_q", "attn_k", "attn_v")),
        Architecture("qwen3", ("qwen3",), {**_LLAMA_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}),
        Architecture(
            "gemma2",
            ("gemma2",),
            {**_BLOCK, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm"},
            norm_offset=1.0,
            untied_output=False,
            extra_keys={"attn_logit_softcapping": "attn_logit_softcapping",
                        "final_logit_softcapping": "final_logit_softcapping",
                        "attention.sliding_window": "sliding_window"},
        ),
    )
}
SUPPORTED = ", ".join(ARCHITECTURES)


def architecture(name: str, where: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise CheckpointError(f"{where}: architecture '{name}' is not supported for GGUF; supported: {SUPPORTED}") from None


def architecture_of_config(config: dict[str, Any] | None, where: str) -> Architecture:
    """The GGUF architecture that a ``config.json``'s ``model_type`` is written as."""
    model_type = (config or {}).get("model_type")
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    types = ", ".join(t for a in ARCHITECTURES.values() for t in a.model_types)
    raise CheckpointError(f"{where}: model_type '{model_type}' cannot be written as GGUF; supported: {types}")


# -- the rotary permutation --------------------------------------------------------------------


def permuted_rows(rows: int, heads: int) -> np.ndarray:
    """``hf_row -> gguf_row`` for llama.cpp's Q/K permutation: within each head, HF's rotate-half
    order (first half, second half) becomes adjacent pairs. ``gguf[perm] == hf``."""
    d = rows // heads // 2
    h, s, j = np.meshgrid(np.arange(heads), np.arange(2), np.arange(d), indexing="ij")
    return (h * 2 * d + 2 * j + s).reshape(-1)


def to_gguf_order(array: np.ndarray, heads: int) -> np.ndarray:
    """HF rows -> GGUF rows (what llama.cpp's converter does to q_proj and k_proj)."""
    out = np.empty_like(array)
    out[permuted_rows(array.shape[0], heads)] = array
    return out


# -- config.json -> <arch>.* metadata ------------------------------------------------------------


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and scaling, from transformers 5's ``rope_parameters`` or 4.x's keys."""
    params = dict(config.get("rope_parameters") or {})
    if config.get("rope_scaling"):
        params = {**dict(config["rope_scaling"]), **params}
    if "rope_theta" not in params and "rope_theta" in config:
        params["rope_theta"] = config["rope_theta"]
    return params


def arch_metadata(arch: Architecture, config: dict[str, Any], where: str) -> dict[str, Any]:
    """Every ``<arch>.*`` key llama.cpp needs, from a Hugging Face config. A missing required value
    is an error naming the field (llama.cpp would silently default some, e.g. the RoPE base)."""

    def need(key: str) -> Any:
        if config.get(key) is None:
            raise CheckpointError(f"{where}: config.json has no '{key}', which the GGUF metadata needs")
        return config[key]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    head_dim = int(config.get("head_dim") or hidden // heads)
    rope = rope_settings(config)
    if rope.get("rope_theta") is None:
        raise CheckpointError(f"{where}: config.json has no rope_theta; llama.cpp would silently assume 10000")
    values: dict[str, Any] = {
        "context_length": int(need("max_position_embeddings")),
        "embedding_length": hidden,
        "block_count": int(need("num_hidden_layers")),
        "feed_forward_length": int(need("intermediate_size")),
        "attention.head_count": heads,
        "attention.head_count_kv": int(config.get("num_key_value_heads") or heads),
        "attention.layer_norm_rms_epsilon": float(need("rms_norm_eps")),
        "rope.freq_base": float(rope["rope_theta"]),
        "rope.dimension_count": head_dim,
        "vocab_size": int(need("vocab_size")),
    }
    if config.get("head_dim"):  # Qwen3's and Gemma's readers default it (to 128, 256) when absent
        values["attention.key_length"] = head_dim
        values["attention.value_length"] = head_dim
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type in ("linear", "yarn"):
        values["rope.scaling.type"] = rope_type
        values["rope.scaling.factor"] = float(rope["factor"])
        if rope.get("original_max_position_embeddings"):
            values["rope.scaling.original_context_length"] = int(rope["original_max_position_embeddings"])
    elif rope_type != "default":
        raise CheckpointError(f"{where}: RoPE scaling '{rope_type}' cannot be written as GGUF yet (linear and yarn can)")
    for key, attribute in arch.extra_keys.items():
        if config.get(attribute) is not None:
            values[key] = config[attribute]
    return {f"{arch.name}.{key}": value for key, value in values.items()}
