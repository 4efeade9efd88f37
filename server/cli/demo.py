"""`fed-server demo`: phantom sites, a SuperLink and one `fed-client join` per site, all on this machine."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedseg.common.cli.shell import SIZE_HELP, guarded, parse_triple
from fedseg.common.console import console
from fedseg.server.cli.live import LiveRounds, summary_lines
from fedseg.server.config import ServerConfig
from fedseg.server.control.baselines import comparison_lines, site_alone, steps_per_site
from fedseg.server.control.demo import DEMO_ROUNDS, DemoOptions, run_demo, write_final_attention
from fedseg.server.control.report import write_report


@guarded
def demo_command(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Server-config overrides key=value, e.g. strategy.name=fedprox.")
    ] = None,
    sites: Annotated[int, typer.Option("--sites", min=1, max=8, help="Number of phantom sites.")] = 3,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.")] = DEMO_ROUNDS,
    out: Annotated[Path, typer.Option("--out", help="Demo folder (data, site workdirs, run).")] = Path("fedseg-demo"),
    size: Annotated[
        str, typer.Option("--size", help=f"Phantom grid {SIZE_HELP} at 2 mm (multiples of 16).")
    ] = "48,48,48",
    cases: Annotated[int, typer.Option("--cases", min=1, help="Phantom cases per site.")] = 3,
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines/--no-baselines",
            help="After the federation, train the same model on each site alone for the same steps and print "
            "both on the central validation set. Each site alone takes about as long as that site's share of the "
            "federation's training, one site after the other (progress shown).",
        ),
    ] = False,
) -> None:
    """Run a small federation end to end and show Dice per organ after every round."""
    opts = DemoOptions(
        out=out.resolve(),
        sites=sites,
        rounds=rounds,
        size=parse_triple(size, "--size"),
        cases_per_site=cases,
        overrides=tuple(overrides or ()),
    )
    live = LiveRounds(title=f"fed-server demo: {sites} phantom sites")
    with live:
        spec = run_demo(opts, live.add, [live.on_event], [live.tick])
    for line in summary_lines(live.rows):
        console.print(line)
    if baselines and live.rows:
        _print_baselines(opts, spec.config, live.rows[-1].dice)
    files = write_final_attention(spec.config, opts.out / "attention")
    pngs = [f for f in files if f.suffix == ".png"]
    if pngs:
        console.print(f"attention maps of the final model: {escape(str(pngs[0]))}")
    console.print(f"history, metrics.csv and checkpoints in [bold]{escape(str(spec.config.output_dir))}[/]")
    console.print(f"report: [bold]{escape(str(write_report(spec.config.output_dir)))}[/]")


def _print_baselines(opts: DemoOptions, cfg: ServerConfig, federated: Mapping[str, float | None]) -> None:
    """Each site alone for the steps it trained in the federation, beside the final global model."""
    steps = steps_per_site(cfg)
    datasets = {name: (opts.data_dir / name, opts.data_dir / name / "labels.toml") for name in opts.site_names}
    alone = site_alone(cfg, datasets, steps, opts.out / "baselines")
    console.print("central validation Dice, the final federated model vs each site alone:")
    for line in comparison_lines(federated, alone):
        console.print(line, highlight=False)
