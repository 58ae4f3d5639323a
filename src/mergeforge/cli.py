"""The command line: parse arguments, call the API, print. The only place that turns
:class:`~mergeforge.errors.MergeforgeError` into a message and an exit code.

Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from mergeforge import __version__

# Commands that live beside the feature they drive, imported only when named (or listed by
# --help), so each feature owns its command and the core CLI stays light. A module that is not
# installed (an optional part still in the works) is simply not listed.
_FEATURE_COMMANDS = {
    "demo": "mergeforge.demo:demo_command",
    "zoo": "mergeforge.zoo.cli:zoo_group",
    "eval": "mergeforge.evaluate.cli:eval_command",
    "bench": "mergeforge.bench.cli:bench_command",
    "moe": "mergeforge.moe.cli:moe_command",
    "analyze": "mergeforge.analysis.cli:analyze_command",
    "lmc": "mergeforge.analysis.cli:lmc_command",
    "align": "mergeforge.analysis.align_cli:align_command",
    "lora": "mergeforge.lora.cli:lora_group",
    "evolve": "mergeforge.evolve.cli:evolve_command",
    "federated": "mergeforge.federated.cli:federated_command",
}


def _feature_available(target: str) -> bool:
    """Whether the command's module is installed, found on disk so that no package is imported
    (``mergeforge.methods`` would import torch and every method)."""
    from pathlib import Path

    parts = target.partition(":")[0].split(".")[1:]
    package_dir = Path(__file__).parent
    return package_dir.joinpath(*parts).with_suffix(".py").is_file() or package_dir.joinpath(*parts, "__init__.py").is_file()


# Optional dependencies (imported where they are used) and the extra that installs each.
OPTIONAL_PACKAGES = {"transformers": "hf", "tokenizers": "hf", "peft": "zoo", "matplotlib": "zoo", "lm_eval": "lmeval", "gguf": "gguf",
                     "scipy": "align", "cma": "evolve", "flwr": "federated", "ray": "ray"}


class _Group(click.Group):
    """Turns user errors into one line on stderr and a non-zero exit, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        features = [name for name, target in _FEATURE_COMMANDS.items() if _feature_available(target)]
        return sorted([*super().list_commands(ctx), *features])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None or name not in _FEATURE_COMMANDS or not _feature_available(_FEATURE_COMMANDS[name]):
            return command
        import importlib

        module, _, attribute = _FEATURE_COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context) -> Any:
        from mergeforge.errors import MergeforgeError

        try:
            return super().invoke(ctx)
        except MergeforgeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except ModuleNotFoundError as exc:
            package = (exc.name or "").partition(".")[0]
            if package not in OPTIONAL_PACKAGES:
                raise
            click.echo(f"error: this needs {package}, which is not installed: pip install 'mergeforge[{OPTIONAL_PACKAGES[package]}]'",
                       err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mergeforge")
def main() -> None:
    """mergeforge: merge fine-tuned language models into one."""


@main.command("methods")
@click.argument("name", required=False)
def methods_command(name: str | None) -> None:
    """List every merge method with its parameters, defaults and math (or one, by NAME)."""
    from mergeforge.methods.registry import all_methods, get_method

    chosen = [get_method(name)] if name else all_methods()
    for method in chosen:
        base = {"none": "", "required": "  [needs base_model]", "optional": "  [base_model optional]"}[method.base.value]
        click.echo(click.style(method.name, bold=True) + base + (f"  (plugin: {method.plugin})" if method.plugin else ""))
        click.echo(f"    {method.math}")
        for param in method.params:
            scope = "per-model" if param.per_model else "global"
            default = "required" if param.required else repr(param.default)
            click.echo(f"    - {param.name} ({scope}, default {default}, range {param.range_text()}): {param.help}")
        click.echo(f"    ref: {method.citation}")
        if method.notes:
            click.echo(f"    note: {method.notes}")


def _setup_logging(quiet: bool) -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("mergeforge")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    logger.propagate = False


@main.command("merge")
@click.argument("config", type=click.Path(dir_okay=False, path_type=str))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str), required=False)
@click.option("--device", default="cpu", show_default=True, help="Where the math runs: cpu, cuda or cuda:N.")
@click.option("--dtype", default=None, help="Round inputs to this dtype before merging (overrides the recipe's dtype).")
@click.option("--out-dtype", default=None, help="Dtype of the written tensors (overrides the recipe's out_dtype).")
@click.option("--math-dtype", type=click.Choice(["float32", "recipe"]), default="float32", show_default=True,
              help="float32: the math runs in float32 whatever the inputs are rounded to (more accurate); recipe: in the "
                   "recipe's dtype, as mergekit does (to reproduce a mergekit merge).")
@click.option("--out-shard-size", default="5GB", show_default=True, help="Largest output shard, in bytes or with a unit (2GB, 500MB).")
@click.option("--threads", type=int, default=None, help="Worker threads (default: one per core, at most 4).")
@click.option("--memory-budget", default=None, help="Bytes of tensors the torch executor holds at once (default: automatic), e.g. 1GB.")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True, help="Copy the tokenizer files.")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensors, bytes to read and write, executor, peak memory); write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random methods (DARE, DELLA).")
@click.option("--out-format", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True,
              help="hf: safetensors shards; gguf: OUT_DIR/model.gguf, which llama.cpp loads.")
@click.option("--out-type", default=None,
              help="Type of a GGUF output: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, or a K-quant such as q4_k_m "
                   "(needs llama-quantize on PATH). Default: the merge's output dtype.")
@click.option("--executor", type=click.Choice(["auto", "numpy", "torch"]), default="auto", show_default=True,
              help="auto: NumPy when it can run the merge (no torch import), else torch.")
@click.option("--intermediate-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="A multi-document CONFIG (mergekit-multi's format): write each named stage to DIR/<name> and keep it "
                   "(default: a temporary folder, deleted at the end).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or warnings.")
def merge_command(config: str, out_dir: str | None, quiet: bool, **flags: Any) -> None:
    """Merge the models of a mergekit-style YAML recipe CONFIG into OUT_DIR.

    CONFIG may hold several '---'-separated documents (mergekit-multi): named stages, merged first
    in dependency order, that later documents read by name, and one unnamed final merge.
    """
    from mergeforge.engine.api import merge
    from mergeforge.engine.options import MergeOptions
    from mergeforge.errors import OutputError

    _setup_logging(quiet)
    if out_dir is None and not flags["dry_run"]:
        raise OutputError("OUT_DIR is required (or pass --dry-run)")
    result = merge(config, out_dir, MergeOptions(quiet=quiet, **flags))
    if flags["dry_run"]:
        click.echo("\n".join(result.plan_lines))
        return
    if not quiet:
        stages = f" after {len(result.stages)} intermediate stage(s)" if result.stages else ""
        click.echo(f"merged {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) into {result.out_dir}{stages} "
                   f"in {result.seconds:.1f} s", err=True)


@main.command("convert")
@click.argument("source", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--out-format", type=click.Choice(["gguf", "hf"]), default="gguf", show_default=True,
              help="gguf: one GGUF file (OUT ending in .gguf, else OUT/model.gguf); hf: a Hugging Face folder of safetensors.")
@click.option("--out-type", default=None,
              help="gguf: f32, f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, q5_1, or a K-quant such as q4_k_m (needs "
                   "llama-quantize); hf: f32, f16 or bf16 (default: as read, float32 for quantized tensors).")
@click.option("--name", default=None, help="general.name of a GGUF output.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def convert_command(source: str, out: str, out_format: str, out_type: str | None, name: str | None, overwrite: bool) -> None:
    """Convert SOURCE (a Hugging Face folder or a GGUF file) into OUT: HF <-> GGUF, or requantize."""
    from mergeforge.checkpoint.convert import convert

    written, warnings = convert(source, out, out_format, out_type, overwrite=overwrite, name=name)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {written}", err=True)


@main.group("emr")
def emr_group() -> None:
    """Per-task models from an EMR-merging (or TALL-mask) output."""


@emr_group.command("materialize")
@click.argument("merged_dir", type=click.Path(path_type=str))
@click.argument("out_dir", type=click.Path(path_type=str))
@click.option("--task", "task", required=True, type=int, help="which input model, counting from 0 in recipe order")
@click.option("--base", "base", type=click.Path(path_type=str), default=None, help="the base model (default: the recipe's base_model)")
@click.option("--overwrite", is_flag=True, help="replace a non-empty OUT_DIR")
def materialize_command(merged_dir: str, out_dir: str, task: int, base: str | None, overwrite: bool) -> None:
    """Write task N's model: θ_base + scale_N · mask_N ⊙ (θ_merged − θ_base), as a full model folder.

    MERGED_DIR is the output of merge_method emr (EMR-merging, arXiv:2405.17461) or tall_mask
    (TALL masks, arXiv:2405.07813).
    """
    from mergeforge.engine.materialize import materialize_task

    written = materialize_task(merged_dir, task, out_dir, base=base, overwrite=overwrite)
    click.echo(f"wrote task {task}'s model to {written}")
