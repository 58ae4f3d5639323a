"""``mergeforge federated SCENARIO.yml OUT_DIR``: the simulation, in process or on Flower's Ray
simulation runtime (``--runtime simulation``), tables and a chart."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("federated")
@click.argument("scenario_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--runtime", type=click.Choice(["local", "simulation"]), default="local", show_default=True,
              help="local: Flower's round loop over in-process clients; simulation: Flower's simulation runtime "
                   "(virtual SuperNodes on Ray, pip install 'mergeforge[ray]').")
@click.option("--quiet", is_flag=True, help="No per-round progress lines.")
def federated_command(scenario_file: Path, out_dir: Path, runtime: str, quiet: bool) -> None:
    """Simulate federated training on the zoo with each aggregator of SCENARIO_FILE (docs/federated.md)."""
    import logging

    from mergeforge.federated.scenario import load_scenario

    scenario = load_scenario(scenario_file)  # every scenario error before flwr, torch or the zoo load

    from transformers.utils import logging as transformers_logging

    from mergeforge.federated.simulation import run_scenario, summary, write_report

    logging.getLogger("flwr").setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    progress = None if quiet else (lambda line: click.echo(line, err=True))
    if runtime == "simulation":
        from mergeforge.federated.flower_app import run_on_simulation

        result = run_on_simulation(scenario, str(scenario_file), progress)
    else:
        result = run_scenario(scenario, progress=progress, source=str(scenario_file))
    paths = write_report(result, out_dir)
    click.echo(summary(result))
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
