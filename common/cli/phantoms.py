"""``fed-eval phantoms``: write synthetic abdominal CT sites and a validation set (MSD layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedseg.common.cli.shell import SIZE_HELP, guarded, parse_triple, result_table, stdout_console
from fedseg.common.synthetic.phantoms import PhantomSite, generate_phantoms, site_grid


@guarded
def phantoms_command(
    out: Annotated[Path, typer.Option("--out", help="Output folder (absent or empty).")],
    sites: Annotated[int, typer.Option("--sites", help="Number of sites site-1 ... site-N.")] = 3,
    cases_per_site: Annotated[int, typer.Option("--cases-per-site", help="Cases per site.")] = 4,
    val_cases: Annotated[int, typer.Option("--val-cases", help="Cases in out/validation (0 = none).")] = 2,
    size: Annotated[
        str, typer.Option("--size", help=f"Neutral grid {SIZE_HELP} at 2 mm; sets body size and each site's matrix.")
    ] = "64,64,64",
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed writes identical files.")] = 0,
    partial_site: Annotated[
        bool, typer.Option("--partial-site", help="The last site annotates only pancreas and liver.")
    ] = False,
) -> None:
    """Generate heterogeneous phantom CT sites (spacing, field of view, HU calibration, noise, labelling)."""
    grid = parse_triple(size, "--size")
    written = generate_phantoms(out, sites, cases_per_site, val_cases, grid, seed, partial_site)
    render_sites(written, grid, stdout_console())


def render_sites(sites: list[PhantomSite], size: tuple[int, int, int], out: Console) -> None:
    """Print one row per written dataset: its grid and acquisition, then its labelling."""
    table = result_table(out, "phantom datasets")
    for column in ("dataset", "cases", "shape z,y,x", "spacing z,y,x mm", "HU", "noise", "dir"):
        table.add_column(column, overflow="fold")
    labelling = result_table(out, "annotated classes (label values)")
    labelling.add_column("dataset")
    labelling.add_column("labels", overflow="fold")
    for site in sites:
        acq = site.acquisition
        shape, spacing = site_grid(size, acq)
        values: dict[str, list[int]] = {}
        for value, name in sorted(site.labels.items()):
            values.setdefault(name, []).append(value)
        table.add_row(
            site.name,
            str(site.cases),
            ",".join(map(str, shape)),
            ",".join(f"{s:.2f}" for s in spacing),
            f"×{acq.hu_scale:.2f} {acq.hu_offset:+.0f}",
            f"{acq.noise_sd:.0f}",
            acq.orientation,
        )
        labelling.add_row(site.name, " ".join(f"{name}={'+'.join(map(str, v))}" for name, v in values.items()))
    out.print(table)
    out.print(labelling)
