"""``mergeforge lora extract|merge|convert``: LoRA adapters from fine-tunes, exact merges of adapters,
and adapters as llama.cpp LoRA GGUF files.

Torch and transformers are imported inside the commands, so ``mergeforge --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group("lora")
def lora_group() -> None:
    """Extract LoRA adapters from fine-tunes, and merge adapters exactly (see docs/lora.md)."""


@lora_group.command("extract")
@click.argument("model", type=str)
@click.argument("base", type=str)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-rank", "--rank", "max_rank", type=int, default=None,
              help="Largest rank per module (default 128 unless --energy is given; with --energy, a cap).")
@click.option("--energy", type=float, default=None,
              help="Keep this share of each delta's squared Frobenius norm, in (0, 1]; sets the rank per module.")
@click.option("--sv-epsilon", type=float, default=0.0, show_default=True, help="Drop singular values at or below this.")
@click.option("--randomized", is_flag=True, help="Randomized SVD (torch.svd_lowrank); its error is measured per module.")
@click.option("--embed-lora", is_flag=True, help="Embeddings as lora_embedding_A/B instead of modules_to_save.")
@click.option("--save-module", "save_modules", multiple=True, help="Save this module whole (modules_to_save); repeatable.")
@click.option("--include-regex", default=None, help="Decompose only modules whose path matches.")
@click.option("--exclude-regex", default=None, help="Do not decompose modules whose path matches.")
@click.option("--skip-undecomposable", is_flag=True,
              help="Leave changed non-matrix modules (norms, biases) out, listed in the report, instead of saving them whole.")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
              help="Split the singular values between lora_A and lora_B (√s each), else all into lora_B.")
@click.option("--out-dtype", default=None, help="Dtype of the stored tensors (default: the fine-tune's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--quiet", "-q", is_flag=True, help="No per-module lines.")
def extract_command(model: str, base: str, out_dir: Path, quiet: bool, save_modules: tuple[str, ...], **flags: object) -> None:
    """Extract MODEL − BASE as a PEFT LoRA adapter into OUT_DIR (mergekit-extract-lora's options)."""
    from mergeforge.lora.extract import ExtractOptions, extract_lora

    options = ExtractOptions(save_modules=save_modules, **flags)  # type: ignore[arg-type]
    echo = None if quiet else (lambda line: click.echo(line, err=True))
    result = extract_lora(model, base, out_dir, options, progress=echo)
    click.echo("\n".join(result.summary_lines()))


@lora_group.command("merge")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rank", type=int, default=None, help="Truncate every merged module to this rank (optimal truncation).")
@click.option("--energy", type=float, default=None, help="Keep this share of each merged update's squared Frobenius norm.")
@click.option("--sv-epsilon", type=float, default=None, help="Drop singular values at or below this.")
@click.option("--knots/--no-knots", default=None, help="Align the adapters in one shared SVD basis first (KnOTS).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random methods (DARE, DELLA).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--quiet", "-q", is_flag=True, help="No per-module lines.")
def merge_command(config: Path, out_dir: Path, rank: int | None, energy: float | None, sv_epsilon: float | None,
                  knots: bool | None, seed: int, overwrite: bool, quiet: bool) -> None:
    """Merge the LoRA adapters of CONFIG (a mergekit-style recipe whose models are adapters of one
    base) with any catalogue method, in delta space, into the adapter OUT_DIR."""
    from mergeforge.lora.merge import merge_adapters

    echo = None if quiet else (lambda line: click.echo(line, err=True))
    result = merge_adapters(config, out_dir, seed=seed, overwrite=overwrite, progress=echo, rank=rank, energy=energy,
                            sv_epsilon=sv_epsilon, knots=knots)
    click.echo("\n".join(result.summary_lines()))


@lora_group.command("convert")
@click.argument("adapter", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--base", default=None,
              help="The adapter's base model (a Hugging Face folder or a GGUF file; its config and shapes are used). "
                   "Default: the adapter's base_model_name_or_path.")
@click.option("--out-type", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f32", show_default=True,
              help="GGUF type of the LoRA factors (the types llama.cpp's convert_lora_to_gguf.py writes).")
@click.option("--name", default=None, help="general.name of the GGUF (default: the adapter folder's name).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def convert_command(adapter: Path, out: Path, base: str | None, out_type: str, name: str | None, overwrite: bool) -> None:
    """Write the PEFT LoRA ADAPTER as llama.cpp's LoRA GGUF OUT (a .gguf file, else OUT/adapter.gguf),
    for `llama-cli -m base.gguf --lora OUT`."""
    from mergeforge.lora.gguf_export import convert_lora

    result = convert_lora(adapter, out, base=base, out_type=out_type, overwrite=overwrite, name=name)
    click.echo("\n".join(result.summary_lines()), err=True)
