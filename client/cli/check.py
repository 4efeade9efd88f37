"""``fed-client check``: validate a site's dataset folder and list usable and skipped cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedseg.common.cli.shell import guarded
from fedseg.common.data.manifest import GLOBAL_CLASSES, LabelManifest, site_manifest
from fedseg.common.data.sitecheck import SiteReport, check_site
from fedseg.common.errors import DataError, FedsegError


@guarded
def check_command(
    data_dir: Annotated[Path, typer.Argument(help="Dataset folder: MSD/nnU-Net (dataset.json) or images/+labels/.")],
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="Label manifest (.toml/.json) or a built-in name (totalsegmentator, msd_pancreas, phantom). "
            "Default: DATA_DIR/labels.toml if present, else identity 1 pancreas, 2 spleen, 3 kidney, 4 liver.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Check every case (readable, 3D, same grid, CT range, known labels); exit 1 when none is usable."""
    try:
        manifest = site_manifest(data_dir, labels)
        report = check_site(data_dir, manifest, progress=not as_json)
    except FedsegError as err:
        if as_json:
            typer.echo(json.dumps({"data_dir": str(data_dir), "error": str(err)}))
        raise
    if as_json:
        typer.echo(json.dumps({"data_dir": str(data_dir), **report.to_dict()}))
    else:
        _render(report, data_dir, manifest)
    if not report.usable:
        first = report.skipped[0][1] if report.skipped else "no cases"
        raise DataError(f"no usable case in {data_dir} ({len(report.skipped)} skipped; first: {first})")


def _render(report: SiteReport, data_dir: Path, manifest: LabelManifest) -> None:
    out = Console()
    if report.usable:
        usable = Table(title=Text(f"Usable cases in {data_dir}"), box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
        for column in ("Case", "Shape", "Spacing mm", "HU range", *GLOBAL_CLASSES[1:], "Missing"):
            number = column in GLOBAL_CLASSES
            usable.add_column(column, justify="right" if number else "left", overflow="fold", no_wrap=number)
        for summary in report.summaries:
            usable.add_row(
                Text(summary.case_id),
                "×".join(str(n) for n in summary.shape),
                "×".join(f"{s:g}" for s in summary.spacing),
                f"{summary.hu_range[0]:g}..{summary.hu_range[1]:g}",
                *(
                    f"{n:,}" if annotated else "–"
                    for n, annotated in zip(summary.class_voxels[1:], manifest.annotated_mask()[1:], strict=True)
                ),
                ", ".join(summary.missing),
            )
        out.print(usable)
    if report.skipped:
        skipped = Table(title="Skipped cases", title_style="yellow", box=box.SIMPLE_HEAD)
        skipped.add_column("Case")
        skipped.add_column("Reason", overflow="fold")
        for case_id, reason in report.skipped:
            skipped.add_row(case_id, Text(reason))
        out.print(skipped)
    if not all(manifest.annotated_mask()):
        out.print("– = class not annotated at this site (unlabelled, not background)", style="dim")
    total = len(report.usable) + len(report.skipped)
    style = "green" if report.usable else "red"
    out.print(f"[{style}]{len(report.usable)} of {total} cases usable[/]", highlight=False)
