"""The command line: parse arguments, call the API, print. The only place that turns
:class:`~mergeforge.errors.MergeforgeError` into a message and an exit code.

Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import sys

import click

from mergeforge import __version__


class _Group(click.Group):
    """Turns user errors into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        from mergeforge.errors import MergeforgeError

        try:
            return super().invoke(ctx)
        except MergeforgeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
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
        click.echo(f"    ref: {method.reference}")
        if method.notes:
            click.echo(f"    note: {method.notes}")
