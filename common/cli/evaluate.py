"""``fed-eval evaluate``: score predicted label maps against references (Dice, precision, recall, ASSD, HD95)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedseg.common.cli.shell import guarded, result_table, stdout_console
from fedseg.common.console import console as stderr_console
from fedseg.common.data.manifest import load_manifest
from fedseg.common.eval.evaluation import (
    DEFAULT_CLASSES,
    EvaluationReport,
    LabelSchemes,
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
    ref: Annotated[
        Path,
        typer.Option("--ref", help="Reference label map or folder; cases pair by case id (predict's _seg is dropped)."),
    ],
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            metavar="MANIFEST|NAME",
            help="Label manifest of the references (labels.toml or a built-in name such as totalsegmentator): "
            "maps their values to the federation's classes as training does; only its annotated classes are scored.",
        ),
    ] = None,
    pred_labels: Annotated[
        str | None,
        typer.Option(
            "--pred-labels",
            metavar="MANIFEST|NAME",
            help="Label manifest of the predictions, when they use another label scheme (default: global classes).",
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes", help=f"Raw label values to score, as <label>=<name> pairs (default {_DEFAULT_TEXT})."
        ),
    ] = None,
    json_out: Annotated[
        str | None, typer.Option("--json", metavar="FILE", help="Write the full report as JSON; '-' = stdout.")
    ] = None,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", metavar="FILE", help="Write one row per case and class as CSV.")
    ] = None,
) -> None:
    """Score predictions against references per case and class; print a summary table.

    Means skip undefined values: Dice when both masks are empty, distances (mm) when either is. A prediction
    holding the reference's voxels in another axis order or direction is reoriented (said in the log); one that
    needs resampling is refused.
    """
    schemes = LabelSchemes(
        ref=load_manifest(labels) if labels is not None else None,
        pred=load_manifest(pred_labels) if pred_labels is not None else None,
    )
    report = evaluate(pred, ref, parse_classes(classes) if classes is not None else None, schemes)
    to_stdout = json_out == "-"
    render_summary(report, stderr_console if to_stdout else stdout_console())
    if to_stdout:
        typer.echo(json.dumps(report_to_dict(report), indent=2, allow_nan=False))
    elif json_out is not None:
        write_json(report, Path(json_out))
    if csv_out is not None:
        write_csv(report, csv_out)


def render_summary(report: EvaluationReport, out: Console) -> None:
    """Print the per-class summary table (mean±sd over defined values) and the skipped references."""
    table = result_table(out, f"{len(report.cases)} case(s), mean ±sd")
    for column in ("class", "Dice", "precision", "recall", "ASSD mm", "HD95 mm", "empty"):
        table.add_column(column, justify="left" if column == "class" else "right", overflow="fold")
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


def _cell(summary: MetricSummary, digits: int) -> str:
    if summary.n == 0:
        return "-"
    sd = "" if math.isnan(summary.sd) else f" ±{summary.sd:.{digits}f}"
    return f"{summary.mean:.{digits}f}{sd}"
