"""``mergeforge demo``: the README's main job. Builds small example checkpoints, merges them with
the shipped mergekit recipe (examples/ties.yml), loads the result with transformers and runs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

EXAMPLE_RECIPE = """\
merge_method: ties
base_model: models/base
models:
  - model: models/base
  - model: models/expert-a
    parameters: {weight: 1.0, density: 0.5}
  - model: models/expert-b
    parameters: {weight: 1.0, density: 0.5}
  - model: models/expert-c
    parameters: {weight: [0.5, 1.0], density: 0.5}
parameters:
  normalize: true
dtype: float32
"""


def build_example_models(folder: Path) -> None:
    """A tiny random Llama base and three 'fine-tunes' (the base plus small perturbations)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(folder / "base")
    for seed, name in enumerate(("expert-a", "expert-b", "expert-c"), start=1):
        generator = torch.Generator().manual_seed(seed)
        expert = LlamaForCausalLM(config)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
        expert.save_pretrained(folder / name)


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache/demo"), show_default=True)
def demo_command(workdir: Path) -> None:
    """Build example checkpoints, merge them with a shipped mergekit recipe, and run the result."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergeforge.api import merge

    models = workdir / "models"
    if not (models / "expert-c" / "config.json").is_file():
        shutil.rmtree(models, ignore_errors=True)
        click.echo(f"building example checkpoints in {models} ...")
        build_example_models(models)
    recipe = workdir / "ties.yml"
    recipe.write_text(EXAMPLE_RECIPE)
    out = workdir / "merged-ties"
    result = merge(recipe, out, overwrite=True)
    click.echo(f"merged {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) with {result.method} in {result.seconds:.2f} s -> {out}")
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    click.echo(f"transformers loaded the merged model; logits shape {tuple(logits.shape)}")


__all__ = ["demo_command"]
