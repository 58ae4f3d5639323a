"""Router weights from mergekit-moe's gate modes (see :mod:`mergeforge.moe.config`).

Each mode gives a ``[layers, experts, hidden]`` tensor: row ``e`` of layer ``l`` is expert ``e``'s
router row at that layer. Prompts are encoded as mergekit encodes them (the tokenizer's beginning
token, then the prompt text, no other special tokens), in one left-padded batch per expert.
``hidden_avg`` averages over each prompt's real tokens; mergekit also averages its padding
positions, which only differs when an expert's prompts have different lengths.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mergeforge.moe.config import MoEConfig, MoEExpert


def encode_prompts(tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """mergekit-moe's encoding: the beginning token's text, then the prompt; one left-padded batch."""
    rows = [tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _layer_inputs(model: Any, encoded: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """Per layer, the mean over prompts of the hidden state entering the layer (before its
    attention and norm): at the last token, or averaged over the prompt's tokens."""
    with torch.no_grad():
        states = model(**encoded, output_hidden_states=True).hidden_states[:-1]  # the input of each layer
    stacked = torch.stack([s.float() for s in states])  # [layers, prompts, tokens, hidden]
    if average:
        mask = encoded["attention_mask"].to(stacked.dtype)[None, :, :, None]
        per_prompt = (stacked * mask).sum(2) / mask.sum(2)
    else:
        per_prompt = stacked[:, :, -1, :]
    return per_prompt.mean(1)


def _embedding_sum(embedding: torch.Tensor, encoded: dict[str, torch.Tensor], layers: int) -> torch.Tensor:
    mask = encoded["attention_mask"].bool()
    total = embedding[encoded["input_ids"][mask]].float().sum(0)
    return _unit(total)[None].repeat(layers, 1)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def gate_vectors(config: MoEConfig, experts: list[MoEExpert], base_folder: Path, layers: int, hidden: int,
                 seed: int = 0) -> torch.Tensor:
    """The router rows of ``experts`` under ``config.gate_mode``: ``[layers, len(experts), hidden]``."""
    mode = config.gate_mode
    generator = torch.Generator().manual_seed(seed)
    if mode == "calibrated":  # fitted on the assembled MoE (moe.router); until then no expert is preferred
        return torch.zeros((layers, len(experts), hidden))
    if mode == "random":
        return torch.randn((layers, len(experts), hidden), generator=generator)
    if mode == "uniform_random":  # torch.nn.Linear's default: U(-1/√fan_in, 1/√fan_in)
        bound = 1 / math.sqrt(hidden)
        return torch.empty((layers, len(experts), hidden)).uniform_(-bound, bound, generator=generator)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_folder, local_files_only=True)
    if mode == "cheap_embed":
        from mergeforge.checkpoint.reader import open_checkpoint

        with open_checkpoint(base_folder) as checkpoint:
            embedding = checkpoint.read("model.embed_tokens.weight").float()

        def rows(prompts: list[str]) -> torch.Tensor:
            return _embedding_sum(embedding, encode_prompts(tokenizer, prompts), layers)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_folder, local_files_only=True, dtype=torch.float32).eval()

        def rows(prompts: list[str]) -> torch.Tensor:
            return _layer_inputs(model, encode_prompts(tokenizer, prompts), average=mode == "hidden_avg")

    vectors = []
    for expert in experts:
        assert expert.positive_prompts  # checked with the config
        vector = rows(expert.positive_prompts)
        if expert.negative_prompts:
            vector = vector - rows(expert.negative_prompts)
        vectors.append(_unit(vector))
    return torch.stack(vectors, dim=1)
