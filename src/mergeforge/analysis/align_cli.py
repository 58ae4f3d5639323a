"""``mergeforge align A B OUT``: model B permuted into model A's basis (Git Re-Basin), see
:mod:`mergeforge.analysis.align`. Torch loads only when the command runs."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("align")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--match", type=click.Choice(["weights", "activations"]), default="weights", show_default=True,
              help="weights: weight matching (no data); activations: correlate hidden activations on --data.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Calibration prompts for --match activations: a JSONL file ('text' or 'prompt' per line) or a task folder.")
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True, help="Calibration examples to read.")
@click.option("--residual/--no-residual", default=False, show_default=True,
              help="Also permute the residual stream (embeddings, norms, every layer's input and output dimension).")
@click.option("--signs/--no-signs", default=False, show_default=True,
              help="Also flip the sign of units where that is exact (residual dimensions, MLP units through up/down, value "
                   "dimensions).")
@click.option("--max-sweeps", type=click.IntRange(min=1), default=30, show_default=True,
              help="Weight matching: most coordinate-descent sweeps over the layers and the residual stream.")
@click.option("--no-self-test", is_flag=True, help="Skip the self-test and the check of the written model's logits.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the self-test's random permutation.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--no-copy-tokenizer", is_flag=True, help="Do not copy B's tokenizer files.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def align_command(reference: Path, model: Path, out_dir: Path, match: str, data: Path | None, samples: int, residual: bool, signs: bool,
                  max_sweeps: int, no_self_test: bool, seed: int, overwrite: bool, no_copy_tokenizer: bool, quiet: bool) -> None:
    """Permute MODEL's hidden units to match REFERENCE's and write it to OUT_DIR (see docs/foundations.md).

    The output computes exactly what MODEL computes; only the order of its MLP units, attention
    heads, value dimensions and (with --residual) residual dimensions changes, so that averaging
    it with REFERENCE averages matching units. OUT_DIR/alignment_report.json holds the self-test,
    the weight distance to REFERENCE before and after, and the permutation.
    """
    from transformers.utils import logging as transformers_logging

    from mergeforge.analysis.align import align

    transformers_logging.disable_progress_bar()  # align prints its own lines, not a bar per model load
    echo = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    result = align(reference, model, out_dir, match=match, residual=residual, signs=signs, data=data, samples=samples,
                   run_self_test=not no_self_test, seed=seed, overwrite=overwrite, copy_tokenizer=not no_copy_tokenizer,
                   max_sweeps=max_sweeps, progress=echo)
    report = result.report
    distance = report["weight_distance"]
    click.echo(f"weight distance to the reference: {distance['before']:.4g} before, {distance['after']:.4g} after "
               f"({100 * (1 - distance['after'] / max(distance['before'], 1e-30)):.1f}% lower)")
    test = report.get("self_test")
    if test:
        click.echo(f"self-test passed: permuted logits error {test['permuted_logits_error']:.1e}, identity recovered, "
                   f"written model's logits error {test['output_logits_error']:.1e} (limit {test['tolerance']:g})")
    click.echo(f"wrote {result.out_dir}")
