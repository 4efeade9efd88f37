"""Evaluate predicted label maps against references: pair the files, check them, compute and report metrics.

``pred`` and ``ref`` are NIfTI files or folders. In folders, cases are matched by file name with the ``.nii`` /
``.nii.gz`` suffix removed (``case_001.nii.gz`` pairs with ``case_001.nii``); other files are ignored. A
prediction without a reference is an error; a reference without a prediction is skipped with a warning and
listed in :attr:`EvaluationReport.missing_predictions`, so a partial prediction run is visible but usable.
A single prediction file may also be paired with the file of the same case name in a reference folder.

Each pair must share the grid (shape exactly; spacing, origin and direction within
:data:`GEOMETRY_TOLERANCE`) and hold whole-number labels. Metric conventions are those of
:mod:`fedseg.common.eval.metrics`; label values not listed in ``classes`` are ignored.
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
from fedseg.common.data.io import Volume, is_nifti, read_volume
from fedseg.common.data.manifest import GLOBAL_CLASSES
from fedseg.common.errors import ConfigError, DataError
from fedseg.common.eval.metrics import METRIC_NAMES, ClassMetrics, ClassSummary, label_metrics, summarize

log = logging.getLogger(__name__)

#: Label value -> class name evaluated by default: the federation's global foreground classes.
DEFAULT_CLASSES: dict[int, str] = {value: name for value, name in enumerate(GLOBAL_CLASSES) if value > 0}
#: Largest allowed difference of spacing / origin (mm) and direction cosines between a pred and its ref.
GEOMETRY_TOLERANCE = 1e-3
#: Columns of :func:`write_csv`, one row per case and class.
CSV_COLUMNS: tuple[str, ...] = ("case", "label", "class", *METRIC_NAMES, "ref_voxels", "pred_voxels", "empty")


@dataclass(frozen=True)
class CasePair:
    """A prediction file and its reference file."""

    case_id: str
    pred: Path
    ref: Path


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


def case_name(path: Path) -> str:
    """The case id of a NIfTI path: its file name without ``.nii`` / ``.nii.gz``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def match_cases(pred: Path, ref: Path) -> tuple[list[CasePair], list[Path]]:
    """Pair prediction and reference files by case name.

    Returns:
        ``(pairs sorted by case id, reference files without a prediction)``.

    Raises:
        DataError: a path is missing, a folder has no NIfTI files or a case twice, or a prediction has no
            reference.
        ConfigError: ``pred`` is a folder but ``ref`` is a file.
    """
    for path in (pred, ref):
        if not path.exists():
            raise DataError(f"{path}: no such file or folder; check the path")
    if pred.is_file() and ref.is_file():
        return [CasePair(case_name(pred), pred, ref)], []
    if pred.is_dir() and ref.is_file():
        raise ConfigError(f"--pred {pred} is a folder but --ref {ref} is a file; give two files or two folders")
    refs = _nifti_by_case(ref)
    preds = _nifti_by_case(pred) if pred.is_dir() else {case_name(pred): pred}
    pairs = []
    for case_id, pred_path in sorted(preds.items()):
        if case_id not in refs:
            raise DataError(f"{pred_path}: no reference {case_id}.nii(.gz) in {ref}; add it or remove the prediction")
        pairs.append(CasePair(case_id, pred_path, refs[case_id]))
    missing = [path for case_id, path in sorted(refs.items()) if case_id not in preds] if pred.is_dir() else []
    return pairs, missing


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


def evaluate_case(pair: CasePair, classes: dict[int, str]) -> CaseResult:
    """Read, check and score one pair."""
    pred, ref = read_labels(pair.pred), read_labels(pair.ref)
    check_geometry(pred, ref, pair.pred, pair.ref)
    return CaseResult(pair, label_metrics(pred.array, ref.array, ref.spacing, list(classes)))


def evaluate(pred: Path, ref: Path, classes: dict[int, str]) -> EvaluationReport:
    """Evaluate every matched case (with a progress bar) and summarise each class.

    Raises:
        DataError, ConfigError: see :func:`match_cases`, :func:`read_labels` and :func:`check_geometry`.
    """
    pairs, missing = match_cases(pred, ref)
    if missing:
        names = ", ".join(p.name for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
        log.warning("%d reference case(s) have no prediction and are skipped: %s", len(missing), names)
    results = []
    with Progress(console=console, transient=True) as progress:
        for pair in progress.track(pairs, description="evaluating"):
            results.append(evaluate_case(pair, classes))
            log.debug("evaluated %s", pair.case_id)
    summary = {label: summarize([r.metrics[label] for r in results]) for label in classes}
    return EvaluationReport(classes=dict(classes), cases=results, summary=summary, missing_predictions=missing)


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


def _nifti_by_case(folder: Path) -> dict[str, Path]:
    """Map case id -> NIfTI file in ``folder`` (not recursive; other entries ignored)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and is_nifti(path)):
            continue
        case_id = case_name(path)
        if case_id in found:
            raise DataError(f"{path}: case {case_id} appears twice (also {found[case_id].name}); keep one")
        found[case_id] = path
    if not found:
        raise DataError(f"{folder}: folder holds no NIfTI files (.nii, .nii.gz); check the path")
    return found


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


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
