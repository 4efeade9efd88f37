"""Evaluate predicted label maps against references: pair the files, check them, compute and report metrics.

Cases are paired by :mod:`fedseg.common.eval.pairing`.

Label schemes: a :class:`LabelManifest` for the references (and optionally another for the predictions) maps their
label values onto the federation's global classes exactly as training does; only the classes the reference
manifest annotates are then scored.

Each pair must share the grid: shape exactly; spacing, origin and direction within :data:`GEOMETRY_TOLERANCE`. A
prediction that holds the same physical voxels in another axis order or direction is reoriented losslessly onto the
reference grid (logged); anything that would need interpolation is refused. Labels must be whole numbers. Metric
conventions are those of :mod:`fedseg.common.eval.metrics`; label values not listed in ``classes`` are ignored.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from fedseg.common.console import console
from fedseg.common.data.io import Volume, read_volume
from fedseg.common.data.manifest import GLOBAL_CLASSES, LabelManifest
from fedseg.common.data.orientation import reorient_onto
from fedseg.common.errors import ConfigError, DataError
from fedseg.common.eval.metrics import METRIC_NAMES, ClassMetrics, ClassSummary, label_metrics, summarize
from fedseg.common.eval.pairing import CasePair, match_cases

log = logging.getLogger(__name__)

#: Label value -> class name evaluated by default: the federation's global foreground classes.
DEFAULT_CLASSES: dict[int, str] = {value: name for value, name in enumerate(GLOBAL_CLASSES) if value > 0}
#: Largest allowed difference of spacing / origin (mm) and direction cosines between a pred and its ref.
GEOMETRY_TOLERANCE = 1e-3
#: Columns of :func:`write_csv`, one row per case and class.
CSV_COLUMNS: tuple[str, ...] = ("case", "label", "class", *METRIC_NAMES, "ref_voxels", "pred_voxels", "empty")


@dataclass(frozen=True)
class CaseResult:
    """Metrics of one case, keyed by label value."""

    pair: CasePair
    metrics: dict[int, ClassMetrics]


@dataclass(frozen=True)
class EvaluationReport:
    """Per-case metrics, per-class summaries and the references that had no prediction."""

    classes: dict[int, str]
    cases: list[CaseResult]
    summary: dict[int, ClassSummary]
    missing_predictions: list[Path]


def parse_classes(text: str) -> dict[int, str]:
    """Parse ``"1=spleen,2=pancreas"`` into ``{1: "spleen", 2: "pancreas"}``.

    Raises:
        ConfigError: an entry is not ``<label>=<name>``, a label is not a non-negative integer, or a label or
            name repeats.
    """
    classes: dict[int, str] = {}
    for item in text.split(","):
        value, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not value.isdigit() or not name:
            raise ConfigError(f"--classes entry {item.strip()!r} is not <label>=<name>; use e.g. '1=spleen,2=liver'")
        if int(value) in classes or name in classes.values():
            raise ConfigError(f"--classes repeats {item.strip()!r}; give each label and name once")
        classes[int(value)] = name
    return classes


def read_labels(path: Path) -> Volume:
    """Read a label map; its array becomes int64.

    Raises:
        DataError: unreadable file, or values that are not finite non-negative whole numbers.
    """
    volume = read_volume(path)
    array = volume.array
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (np.mod(array, 1) != 0)
        if bad.any():
            example = array[bad].flat[0]
            raise DataError(f"{path}: non-integer label value {example:g}; labels must be whole numbers (a label map)")
    elif array.dtype.kind not in "iub":
        raise DataError(f"{path}: voxel type {array.dtype} is not a label map; save integer labels")
    labels = array.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: negative label value {labels.min()}; labels must be >= 0")
    return volume.with_array(labels)


def check_geometry(pred: Volume, ref: Volume, pred_path: Path, ref_path: Path) -> None:
    """Raise DataError naming both files when the grids differ (shape exactly, the rest within tolerance)."""
    fields: list[tuple[str, tuple[float, ...], tuple[float, ...]]] = [
        ("spacing (z, y, x)", pred.spacing, ref.spacing),
        ("origin (x, y, z)", pred.origin, ref.origin),
        ("direction", pred.direction, ref.direction),
    ]
    if pred.shape != ref.shape:
        raise DataError(
            f"{pred_path}: shape (z, y, x) {pred.shape} differs from reference {ref_path} {ref.shape}; "
            "resample the prediction onto the reference grid"
        )
    for name, got, want in fields:
        if not np.allclose(got, want, rtol=0.0, atol=GEOMETRY_TOLERANCE):
            raise DataError(
                f"{pred_path}: {name} {_fmt(got)} differs from reference {ref_path} {_fmt(want)}; "
                "resample the prediction onto the reference grid"
            )


@dataclass(frozen=True)
class LabelSchemes:
    """Label manifests mapping references and predictions onto global classes (None: already global or raw)."""

    ref: LabelManifest | None = None
    pred: LabelManifest | None = None


def scored_classes(classes: dict[int, str] | None, schemes: LabelSchemes) -> dict[int, str]:
    """The classes to score: ``classes`` as given, else the reference manifest's annotated global classes.

    Raises:
        ConfigError: explicit ``classes`` together with a manifest (manifests decide the classes).
    """
    manifest = schemes.ref or schemes.pred
    if classes is not None and manifest is not None:
        raise ConfigError("--classes cannot be combined with --labels/--pred-labels; the manifest decides the classes")
    if classes is not None:
        return dict(classes)
    if schemes.ref is not None:
        return {GLOBAL_CLASSES.index(name): name for name in GLOBAL_CLASSES[1:] if name in schemes.ref.annotated}
    return dict(DEFAULT_CLASSES)


def align(pred: Volume, ref: Volume, pred_path: Path, ref_path: Path) -> Volume:
    """``pred`` on ``ref``'s grid: unchanged, or reoriented losslessly (logged); DataError when it needs resampling."""
    moved = reorient_onto(pred, ref, GEOMETRY_TOLERANCE)
    if moved is None:
        check_geometry(pred, ref, pred_path, ref_path)
        return pred
    volume, how = moved
    if not how.is_identity:
        log.info(
            "%s: same voxels as the reference in another orientation; reoriented (%s), no interpolation",
            pred_path,
            how.describe(),
        )
    return volume


def evaluate_case(
    pair: CasePair, classes: dict[int, str], schemes: LabelSchemes | None = None, foreign: set[int] | None = None
) -> CaseResult:
    """Read, map to global classes (with ``schemes``), align and score one pair.

    ``foreign`` collects the prediction's label values that are neither background nor a scored class, when the
    predictions have no manifest of their own (a prediction in another label scheme scores Dice 0 silently).
    """
    schemes = schemes or LabelSchemes()
    pred, ref = read_labels(pair.pred), read_labels(pair.ref)
    pred = align(pred, ref, pair.pred, pair.ref)
    pred_array, ref_array = pred.array, ref.array
    if schemes.pred is not None:
        pred_array = _to_global(schemes.pred, pred_array, pair.pred)
    elif foreign is not None:
        foreign.update(int(v) for v in np.unique(pred_array) if v != 0 and int(v) not in classes)
    if schemes.ref is not None:
        ref_array = _to_global(schemes.ref, ref_array, pair.ref)
    return CaseResult(pair, label_metrics(pred_array, ref_array, ref.spacing, list(classes)))


def evaluate(
    pred: Path, ref: Path, classes: dict[int, str] | None = None, schemes: LabelSchemes | None = None
) -> EvaluationReport:
    """Evaluate every matched case (with a progress bar) and summarise each class.

    Args:
        pred, ref: files or folders (see the module docstring).
        classes: label value -> name to score; None = :func:`scored_classes`.
        schemes: label manifests of the references and predictions.

    Raises:
        DataError, ConfigError: see :func:`match_cases`, :func:`read_labels`, :func:`check_geometry` and
            :func:`scored_classes`, and unknown label values for a manifest with ``other_labels = "error"``.
    """
    schemes = schemes or LabelSchemes()
    chosen = scored_classes(classes, schemes)
    pairs, missing = match_cases(pred, ref)
    if missing:
        names = ", ".join(p.name for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
        log.warning("%d reference case(s) have no prediction and are skipped: %s", len(missing), names)
    results = []
    foreign: set[int] = set()
    with Progress(console=console, transient=True) as progress:
        for pair in progress.track(pairs, description="evaluating"):
            results.append(evaluate_case(pair, chosen, schemes, foreign))
            log.debug("evaluated %s", pair.case_id)
    if foreign:
        shown = ", ".join(str(v) for v in sorted(foreign)[:8]) + (" ..." if len(foreign) > 8 else "")
        log.warning(
            "the predictions hold label values the scored classes do not have (%s): if they use another label "
            "scheme, pass --pred-labels (e.g. --pred-labels totalsegmentator), else they count as background",
            shown,
        )
    summary = {label: summarize([r.metrics[label] for r in results]) for label in chosen}
    return EvaluationReport(classes=chosen, cases=results, summary=summary, missing_predictions=missing)


def report_to_dict(report: EvaluationReport) -> dict[str, Any]:
    """JSON-ready dict (NaN becomes None) keyed by class name; metric distances are in mm."""
    summary = {
        name: {
            "label": label,
            "n_cases": s.n_cases,
            "n_both_empty": s.n_both_empty,
            "n_ref_empty": s.n_ref_empty,
            "n_pred_empty": s.n_pred_empty,
            **{m: {"mean": _num(v.mean), "sd": _num(v.sd), "n": v.n} for m, v in s.metrics.items()},
        }
        for label, name in report.classes.items()
        for s in [report.summary[label]]
    }
    cases = [
        {
            "case": r.pair.case_id,
            "pred": str(r.pair.pred),
            "ref": str(r.pair.ref),
            "classes": {name: _metrics_dict(r.metrics[label]) for label, name in report.classes.items()},
        }
        for r in report.cases
    ]
    return {
        "classes": {str(label): name for label, name in report.classes.items()},
        "summary": summary,
        "cases": cases,
        "missing_predictions": [str(p) for p in report.missing_predictions],
    }


def report_rows(report: EvaluationReport) -> list[dict[str, Any]]:
    """One flat row per case and class with the :data:`CSV_COLUMNS` keys (NaN kept as float)."""
    rows = []
    for result in report.cases:
        for label, name in report.classes.items():
            metrics = result.metrics[label]
            row: dict[str, Any] = {"case": result.pair.case_id, "label": label, "class": name}
            row.update(metrics.as_dict())
            row["empty"] = metrics.empty_state
            rows.append(row)
    return rows


def write_json(report: EvaluationReport, path: Path) -> None:
    """Write :func:`report_to_dict` as indented JSON; DataError if the file cannot be written."""
    _write_text(path, json.dumps(report_to_dict(report), indent=2, allow_nan=False) + "\n")


def write_csv(report: EvaluationReport, path: Path) -> None:
    """Write :func:`report_rows` as CSV (NaN as an empty cell); DataError if the file cannot be written."""
    try:
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in report_rows(report):
                writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
    except OSError as err:
        raise DataError(
            f"{path}: cannot write ({err.strerror or err}); check the folder exists and is writable"
        ) from None


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise DataError(
            f"{path}: cannot write ({err.strerror or err}); check the folder exists and is writable"
        ) from None


def _metrics_dict(metrics: ClassMetrics) -> dict[str, Any]:
    values: dict[str, Any] = {k: _num(v) for k, v in metrics.as_dict().items()}
    values["empty"] = metrics.empty_state
    return values


def _num(value: float | int) -> float | int | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def _to_global(manifest: LabelManifest, array: np.ndarray, path: Path) -> np.ndarray:
    try:
        return manifest.to_global(array).astype(np.int64)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
