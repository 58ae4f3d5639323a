"""The routing report of an MoE: where its routers send the tokens of each expert's prompts.

For every prompt set (the experts' calibration prompts, and held-out prompts where there are
some), each group of prompts is labelled with the expert it belongs to. One forward pass per
group takes every MoE block's input at every real token (as the router sees it), and per layer:

- **utilisation**: each expert's share of the top-k assignments (``experts_per_token`` per token);
- **entropy**: the mean entropy of the per-token routing distribution (softmax over the router
  logits), divided by ``log E`` so that 0 is hard routing and 1 uniform;
- **dead experts**: experts no token of the set chose in its top-k;
- **confusion**: domain × expert, the share of a group's tokens whose top-1 expert is each
  expert; its diagonal is the routing accuracy.

Tokens every group shares (a chat template's opening) count too: they carry no domain, so a
perfect router is not 100% accurate on them. Written as ``routing_report.json`` and as
``routing_report.html``, self-contained (plots embedded as PNG).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import torch

REPORT_JSON = "routing_report.json"
REPORT_HTML = "routing_report.html"


def routing_statistics(model: Any, tokenizer: Any, groups: list[list[str]], experts_per_token: int) -> dict[str, Any]:
    """The report of one prompt set: ``groups[e]`` are prompts of expert ``e``'s domain."""
    from mergeforge.moe.gates import encode_prompts
    from mergeforge.moe.router import block_inputs
    from mergeforge.moe.selftest import moe_block

    blocks = [moe_block(layer) for layer in model.model.layers]
    routers = [getattr(block.gate, "weight").detach().float() for block in blocks]  # noqa: B009 - untyped parameter
    experts = routers[0].shape[0]
    top1 = torch.zeros(len(blocks), len(groups), experts)  # tokens of group g whose top-1 is e, per layer
    chosen = torch.zeros(len(blocks), experts)  # top-k assignments per expert
    entropy = torch.zeros(len(blocks))
    tokens = 0
    for group, prompts in enumerate(groups):
        inputs = block_inputs(model, blocks, encode_prompts(tokenizer, prompts))
        tokens += len(inputs[0])
        for layer, (x, router) in enumerate(zip(inputs, routers, strict=True)):
            logits = x @ router.T
            probabilities = torch.softmax(logits, -1)
            entropy[layer] += float(-(probabilities * probabilities.clamp_min(1e-30).log()).sum())
            top1[layer, group] += torch.bincount(logits.argmax(-1), minlength=experts).float()
            chosen[layer] += torch.bincount(logits.topk(experts_per_token, -1).indices.flatten(), minlength=experts).float()
    confusion = top1 / top1.sum(-1, keepdim=True).clamp_min(1)  # [layers, groups, experts], rows sum to 1
    utilisation = chosen / chosen.sum(-1, keepdim=True)
    diagonal = [float(confusion[:, g, g].mean()) for g in range(min(len(groups), experts))]
    return {
        "tokens": tokens,
        "routing_accuracy": sum(diagonal) / len(diagonal),
        "routing_accuracy_per_domain": diagonal,
        "confusion": confusion.mean(0).tolist(),
        "layers": [{"utilisation": utilisation[layer].tolist(),
                    "entropy": float(entropy[layer]) / tokens / math.log(experts) if experts > 1 else 0.0,
                    "dead_experts": [e for e in range(experts) if chosen[layer, e] == 0],
                    "routing_accuracy": float(sum(confusion[layer, g, g] for g in range(len(diagonal))) / len(diagonal))}
                   for layer in range(len(blocks))],
    }


def routing_report(model: Any, tokenizer: Any, prompt_sets: dict[str, list[list[str]]], experts_per_token: int,
                   expert_names: list[str]) -> dict[str, Any]:
    """:func:`routing_statistics` for each named prompt set (sets with no prompts are skipped)."""
    return {"experts": expert_names, "experts_per_token": experts_per_token,
            "sets": {name: routing_statistics(model, tokenizer, groups, experts_per_token)
                     for name, groups in prompt_sets.items() if all(groups)}}


def write_routing_report(report: dict[str, Any], folder: Path) -> None:
    """``routing_report.json`` and ``routing_report.html`` (self-contained) into ``folder``."""
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (folder / REPORT_HTML).write_text(_html(report), encoding="utf-8")


def _html(report: dict[str, Any]) -> str:
    names = [html.escape(n) for n in report["experts"]]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>MoE routing report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
             f"<h1>Routing report</h1><p>{len(names)} experts, top-{report['experts_per_token']} routing.</p>"]
    for set_name, stats in report["sets"].items():
        dead = sorted({e for layer in stats["layers"] for e in layer["dead_experts"]})
        parts.append(f"<h2>{html.escape(set_name)} prompts ({stats['tokens']} tokens)</h2>"
                     f"<p>Routing accuracy (top-1 expert is the domain's, averaged over layers): "
                     f"{100 * stats['routing_accuracy']:.1f}%. Dead experts (chosen by no token at some layer): "
                     f"{', '.join(names[e] for e in dead) or 'none'}.</p>")
        parts.append("<table><tr><th>domain \\ top-1 expert</th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>")
        for name, row in zip(names, stats["confusion"], strict=False):
            parts.append(f"<tr><th>{name}</th>" + "".join(f"<td>{100 * v:.0f}%</td>" for v in row) + "</tr>")
        parts.append("</table>")
        image = _figure(stats, report["experts"])
        if image:
            parts.append(f"<p><img alt='utilisation and entropy per layer' src='data:image/png;base64,{image}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _figure(stats: dict[str, Any], names: list[str]) -> str | None:
    """Utilisation per layer (heatmap), the confusion matrix and entropy per layer, as base64 PNG;
    None without matplotlib (the tables above still say it all)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    utilisation = [layer["utilisation"] for layer in stats["layers"]]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    shown = axes[0].imshow(torch.tensor(utilisation).T.numpy(), aspect="auto", cmap="viridis", vmin=0)
    axes[0].set(title="expert utilisation (share of top-k)", xlabel="layer", yticks=range(len(names)), yticklabels=names)
    figure.colorbar(shown, ax=axes[0])
    shown = axes[1].imshow(torch.tensor(stats["confusion"]).numpy(), cmap="Blues", vmin=0, vmax=1)
    axes[1].set(title="domain × top-1 expert", xticks=range(len(names)), yticks=range(len(stats["confusion"])),
                yticklabels=names[:len(stats["confusion"])], xlabel="expert")
    axes[1].set_xticklabels(names, rotation=90)
    figure.colorbar(shown, ax=axes[1])
    axes[2].plot([layer["entropy"] for layer in stats["layers"]], marker="o", label="entropy / log E")
    axes[2].plot([layer["routing_accuracy"] for layer in stats["layers"]], marker="s", label="routing accuracy")
    axes[2].set(title="per layer", xlabel="layer", ylim=(0, 1.05))
    axes[2].legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=90, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
