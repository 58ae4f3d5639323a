"""``mergeforge emr``: per-task models from a merge that stores per-task masks.

``mergeforge emr materialize MERGED_DIR --task N OUT_DIR`` rebuilds task N's model from the output
of ``merge_method: emr`` (EMR-merging, arXiv:2405.17461) or ``merge_method: tall_mask`` (TALL
masks, arXiv:2405.07813). Only click and the standard library are imported here, so
``mergeforge --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group("emr")
def emr_group() -> None:
    """Per-task models from an EMR-merging (or TALL-mask) output."""


@emr_group.command("materialize")
@click.argument("merged_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--task", "task", required=True, type=int, help="which input model, counting from 0 in recipe order")
@click.option("--base", "base", type=click.Path(path_type=Path), default=None, help="the base model (default: the recipe's base_model)")
@click.option("--overwrite", is_flag=True, help="replace a non-empty OUT_DIR")
def materialize_command(merged_dir: Path, out_dir: Path, task: int, base: Path | None, overwrite: bool) -> None:
    """Write task N's model: θ_base + scale_N · mask_N ⊙ (θ_merged − θ_base), as a full model folder."""
    from mergeforge.methods._materialize import materialize_task

    written = materialize_task(merged_dir, task, out_dir, base=base, overwrite=overwrite)
    click.echo(f"wrote task {task}'s model to {written}")
