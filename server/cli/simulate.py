"""`fed-server simulate`: N virtual phantom sites on Flower's simulation runtime (Ray), one process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedseg.common.cli.shell import SIZE_HELP, guarded, parse_triple
from fedseg.common.console import console
from fedseg.server.cli.live import summary_lines
from fedseg.server.control.simulate import SimOptions, simulate
from fedseg.server.run.history import read_history


@guarded
def simulate_command(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Server-config overrides key=value, e.g. model.feature_scale=32.")
    ] = None,
    sites: Annotated[int, typer.Option("--sites", min=1, help="Virtual sites (simulated SuperNodes).")] = 10,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.")] = 3,
    out: Annotated[Path, typer.Option("--out", help="Folder for data, site workdirs and the run.")] = Path(
        "fedseg-simulate"
    ),
    size: Annotated[
        str, typer.Option("--size", help=f"Phantom grid {SIZE_HELP} at 2 mm (multiples of 16).")
    ] = "32,32,32",
    cases: Annotated[int, typer.Option("--cases", min=1, help="Phantom cases per site.")] = 2,
    cpus_per_site: Annotated[
        float, typer.Option("--cpus-per-site", min=0.01, help="CPU cores Ray reserves per training site.")
    ] = 1.0,
) -> None:
    """Run the same ServerApp and ClientApp on Flower's simulation engine with many virtual sites."""
    opts = SimOptions(
        out=out.resolve(),
        sites=sites,
        rounds=rounds,
        size=parse_triple(size, "--size"),
        cases_per_site=cases,
        cpus_per_site=cpus_per_site,
        overrides=tuple(overrides or ()),
    )
    spec = simulate(opts)
    for line in summary_lines(read_history(spec.config.output_dir)):
        console.print(line)
    console.print(f"history, metrics.csv and checkpoints in [bold]{escape(str(spec.config.output_dir))}[/]")
