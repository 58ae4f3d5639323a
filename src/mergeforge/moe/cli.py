"""``mergeforge moe CONFIG OUT_DIR``: a Mixture-of-Experts model from a mergekit-moe YAML."""

from __future__ import annotations

from pathlib import Path

import click

from mergeforge.moe import ALLOW_ALL_SAME_FLAG


@click.command("moe")
@click.argument("config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--no-copy-tokenizer", is_flag=True, help="Do not copy the base's tokenizer files.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random gate modes and of noise_scale.")
@click.option("--no-self-test", is_flag=True, help="Skip the self-tests (they load the MoE in float32).")
@click.option("--out-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--fused-experts", is_flag=True,
              help="Write transformers 5's fused expert tensors (mlp.experts.gate_up_proj/down_proj) instead of one tensor per "
                   "expert; transformers 4.x cannot load them.")
@click.option(ALLOW_ALL_SAME_FLAG, "allow_all_same", is_flag=True,
              help="Build even if every expert is the same model (useful only to train the MoE afterwards, or for the self-tests).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def moe_command(config_path: Path, out_dir: Path, overwrite: bool, no_copy_tokenizer: bool, seed: int, no_self_test: bool,
                out_shard_size: str, fused_experts: bool, allow_all_same: bool, quiet: bool) -> None:
    """Build a Mixture-of-Experts model from the dense experts of a mergekit-moe CONFIG (see docs/moe.md)."""
    from mergeforge.engine.rules import parse_size
    from mergeforge.moe.build import build_moe
    from mergeforge.moe.config import load_moe_config

    config = load_moe_config(config_path, allow_all_same=allow_all_same)
    echo = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    result = build_moe(config, out_dir, relative_to=config_path.parent, overwrite=overwrite, copy_tokenizer=not no_copy_tokenizer,
                       seed=seed, self_test=not no_self_test, shard_bytes=parse_size(out_shard_size),
                       recipe_text=config_path.read_text(encoding="utf-8"), fused=fused_experts, progress=echo)
    click.echo(f"{result.architecture} MoE: {result.experts} experts, top-{result.experts_per_token}, "
               f"{result.total_parameters / 1e6:.1f}M parameters ({result.active_parameters / 1e6:.1f}M active per token)")
    if result.self_tests:
        tests = result.self_tests
        click.echo(f"self-tests passed: base logits error {tests['base_logits_error']:.1e}, "
                   f"expert MLP errors up to {max(tests['expert_mlp_errors']):.1e} (limit {tests['tolerance']:g})")
    for name, accuracy in (result.routing or {}).items():
        click.echo(f"routing accuracy on the {name} prompts: {100 * accuracy:.1f}% (routing_report.html)")
    click.echo(f"wrote {out_dir}")
