"""The output ensemble baseline: run every expert and average their next-token distributions.

It costs N forward passes per token (what merging avoids), so it is the reference a merge is
measured against in the literature's tables alongside the individual experts and multi-task
training. It behaves like a causal LM for the evaluator: ``forward`` returns ``.logits`` (log of the
mean of the members' probabilities) and ``generate`` decodes greedily.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch


class OutputEnsemble(torch.nn.Module):
    """Averages the next-token probabilities of causal LMs that share a tokenizer."""

    def __init__(self, members: Sequence[torch.nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = torch.nn.ModuleList(members)
        self.name_or_path = f"ensemble of {len(members)}"
        self.config = getattr(members[0], "config", None)  # the members share an architecture and a vocabulary

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> SimpleNamespace:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Positions count real tokens only, so left padding does not shift them (as generate does).
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        mean_probs = None
        for member in self.members:
            logits = member(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            probs = torch.softmax(logits.float(), dim=-1)
            mean_probs = probs if mean_probs is None else mean_probs.add_(probs)
        assert mean_probs is not None
        return SimpleNamespace(logits=torch.log(mean_probs.div_(len(self.members)).clamp_(min=1e-30)))

    def answer_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      positions: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`forward`'s logits at ``positions[row]`` of each row (right-padded rows, as the
        evaluator's teacher-forced pass gives them), each member running its output head at those
        positions only: the evaluator's fast path, member by member."""
        from mergeforge.evaluate.scoring import answer_logits

        mean_probs: list[torch.Tensor] | None = None
        for member in self.members:
            probs = [torch.softmax(logits.float(), dim=-1) for logits in answer_logits(member, input_ids, attention_mask, positions)]
            mean_probs = probs if mean_probs is None else [m.add_(p) for m, p in zip(mean_probs, probs, strict=True)]
        assert mean_probs is not None
        return [torch.log(m.div_(len(self.members)).clamp_(min=1e-30)) for m in mean_probs]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config: Any, **_: Any) -> torch.Tensor:
        """Greedy decoding; rows that emitted end-of-sequence continue with padding."""
        eos = generation_config.eos_token_id
        pad = generation_config.pad_token_id
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _step in range(generation_config.max_new_tokens):
            next_token = self.forward(input_ids, attention_mask).logits[:, -1].argmax(-1)
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            input_ids = torch.cat([input_ids, next_token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)
            if eos is not None:
                finished |= next_token == eos
                if bool(finished.all()):
                    break
        return input_ids
