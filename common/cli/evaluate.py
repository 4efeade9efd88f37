"""``fed-eval evaluate``: score predicted label maps against references (Dice, precision, recall, ASSD, HD95)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fedseg.common.cli.shell import guarded
from fedseg.common.console import console as stderr_console
from fedseg.common.eval.evaluation import (
    DEFAULT_CLASSES,
    EvaluationReport,
    evaluate,
    parse_classes,
    report_to_dict,
    write_csv,
    write_json,
)
from fedseg.common.eval.metrics import MetricSummary

_DEFAULT_TEXT = ",".join(f"{label}={name}" for label, name in DEFAULT_CLASSES.items())


@guarded
def evaluate_command(
    pred: Annotated[Path, typer.Option("--pred", help="Predicted label map (NIfTI) or folder of them.")],
    ref: Annotated[Path, typer.Option("--ref", help="Reference label map or folder; cases match by file name.")],
    classes: Annotated[
        str, typer.Option("--classes", help="Label values to score, as <label>=<name> pairs.")
    ] = _DEFAULT_TEXT,
    json_out: Annotated[
        str | None, typer.Option("--json", metavar="FILE", help="Write the full report as JSON; '-' = stdout.")
    ] = None,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", metavar="FILE", help="Write one row per case and class as CSV.")
    ] = None,
) -> None:
    """Score predictions against references per case and class; print a summary table.

    Means skip undefined values: Dice when both masks are empty, distances (mm) when either is.
    """
    report = evaluate(pred, ref, parse_classes(classes))
    to_stdout = json_out == "-"
    render_summary(report, stderr_console if to_stdout else _stdout_console())
    if to_stdout:
        typer.echo(json.dumps(report_to_dict(report), indent=2, allow_nan=False))
    elif json_out is not None:
        write_json(report, Path(json_out))
    if csv_out is not None:
        write_csv(report, csv_out)


def render_summary(report: EvaluationReport, out: Console) -> None:
    """Print the per-class summary table (mean±sd over defined values) and the skipped references."""
    table = Table(
        title=f"{len(report.cases)} case(s), mean±sd",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )
    for column in ("class", "Dice", "precision", "recall", "ASSD mm", "HD95 mm", "empty"):
        table.add_column(column, justify="left" if column == "class" else "right", no_wrap=True)
    for label, name in report.classes.items():
        summary = report.summary[label]
        cells = [_cell(summary.metrics[m], digits=3) for m in ("dice", "precision", "recall")]
        cells += [_cell(summary.metrics[m], digits=2) for m in ("assd", "hd95")]
        empty = f"{summary.n_both_empty}/{summary.n_ref_empty}/{summary.n_pred_empty}"
        table.add_row(f"{label} {name}", *cells, empty)
    out.print(table)
    out.print("empty: cases with both / only the reference / only the prediction empty", style="dim")
    if report.missing_predictions:
        out.print(f"skipped {len(report.missing_predictions)} reference(s) without a prediction", highlight=False)


def _stdout_console() -> Console:
    """Console for stdout; wide enough for the table when writing to a file or pipe."""
    out = Console()
    if not out.is_terminal:
        out.width = 120
    return out


def _cell(summary: MetricSummary, digits: int) -> str:
    if summary.n == 0:
        return "-"
    sd = "" if math.isnan(summary.sd) else f"±{summary.sd:.{digits}f}"
    return f"{summary.mean:.{digits}f}{sd}"
