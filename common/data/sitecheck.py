"""Validate a site's dataset before it joins a federation: which cases are usable, and why the others are not.

Each case is read once (image and label) and must pass, in order:

1. a label file exists and both files are readable 3D volumes without NaN/inf voxels
   (:func:`fedseg.common.data.io.read_volume` checks all of that);
2. image and label share one grid: same shape, spacing within :data:`SPACING_TOL_MM`, origin within
   :data:`ORIGIN_TOL_MM`, direction cosines within :data:`DIRECTION_TOL`;
3. the image looks like CT in Hounsfield units: not constant, minimum between
   :data:`HU_MIN` and :data:`AIR_HU` (a body CT always shows air), maximum at most :data:`HU_MAX`;
4. label values are whole numbers known to the site's manifest (:meth:`LabelManifest.to_global`);
5. at least one annotated class is present. Annotated classes missing from a usable case are reported as notes.

A failing case is skipped with one reason that names the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import Progress

from fedseg.common.console import console
from fedseg.common.data.io import Volume, read_volume
from fedseg.common.data.layouts import CaseFiles, discover_cases
from fedseg.common.data.manifest import GLOBAL_CLASSES, LabelManifest
from fedseg.common.errors import DataError

SPACING_TOL_MM = 1e-3
ORIGIN_TOL_MM = 1e-2
DIRECTION_TOL = 1e-4
#: Lowest plausible value: CT outside the field of view is often padded with -2048 or -3024.
HU_MIN = -4096.0
#: Highest plausible value; dense metal on the standard 12-bit scale clips at 3071.
HU_MAX = 5000.0
#: A body CT contains air (about -1000 HU); an image whose minimum is above this is not in Hounsfield units.
AIR_HU = -500.0


@dataclass(frozen=True)
class CaseSummary:
    """What the check found in a usable case.

    Attributes:
        case_id: the case.
        shape: array shape ``(Z, Y, X)``.
        spacing: voxel size ``(z, y, x)`` in mm.
        hu_range: image minimum and maximum.
        class_voxels: voxel count per global class, in :data:`GLOBAL_CLASSES` order.
        missing: annotated classes with no voxel in this case.
    """

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    hu_range: tuple[float, float]
    class_voxels: tuple[int, ...]
    missing: tuple[str, ...]


@dataclass
class SiteReport:
    """Result of :func:`check_site`: usable cases (with summaries, same order) and skipped ``(case_id, reason)``."""

    usable: list[CaseFiles]
    skipped: list[tuple[str, str]]
    summaries: list[CaseSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "usable": [
                {
                    "case_id": s.case_id,
                    "image": str(c.image),
                    "label": str(c.label),
                    "shape": list(s.shape),
                    "spacing": list(s.spacing),
                    "hu_range": list(s.hu_range),
                    "class_voxels": dict(zip(GLOBAL_CLASSES, s.class_voxels, strict=True)),
                    "missing": list(s.missing),
                }
                for c, s in zip(self.usable, self.summaries, strict=True)
            ],
            "skipped": [{"case_id": case_id, "reason": reason} for case_id, reason in self.skipped],
        }


def check_site(root: str | Path, manifest: LabelManifest, progress: bool = False) -> SiteReport:
    """Check every case of a dataset folder.

    Args:
        root: dataset folder in any layout :func:`fedseg.common.data.layouts.discover_cases` knows.
        manifest: the site's label manifest.
        progress: show a transient rich progress bar on the shared console.

    Returns:
        The report; it may have no usable case (the caller decides what that means).

    Raises:
        DataError: the folder itself is unusable (missing, empty, unknown layout, bad dataset.json).
    """
    cases = discover_cases(root)
    report = SiteReport(usable=[], skipped=[])
    with Progress(console=console, transient=True, disable=not progress) as bar:
        for case in bar.track(cases, description="checking cases"):
            try:
                summary = check_case(case, manifest)
            except DataError as err:
                report.skipped.append((case.case_id, str(err)))
                continue
            report.usable.append(case)
            report.summaries.append(summary)
    return report


def check_case(case: CaseFiles, manifest: LabelManifest) -> CaseSummary:
    """Check one case (see the module docstring for the rules).

    Raises:
        DataError: the first problem found, naming the file.
    """
    if case.label is None:
        raise DataError(f"{case.image}: no label file found for case {case.case_id}; add labels/{case.case_id}.nii.gz")
    image = read_volume(case.image)
    label = read_volume(case.label)
    check_same_grid(image, label, case.label)
    hu_range = check_hounsfield(image.array, case.image)
    try:
        global_label = manifest.to_global(label.array)
    except DataError as err:
        raise DataError(f"{case.label}: {err}") from None
    counts = np.bincount(global_label.ravel(), minlength=len(GLOBAL_CLASSES))
    missing = tuple(name for name in manifest.annotated if counts[GLOBAL_CLASSES.index(name)] == 0)
    if len(missing) == len(manifest.annotated):
        raise DataError(
            f"{case.label}: none of the annotated classes ({', '.join(manifest.annotated)}) is present; "
            "check the label manifest"
        )
    return CaseSummary(
        case_id=case.case_id,
        shape=image.shape,
        spacing=image.spacing,
        hu_range=hu_range,
        class_voxels=tuple(int(n) for n in counts),
        missing=missing,
    )


def check_same_grid(image: Volume, label: Volume, label_path: Path) -> None:
    """Raise DataError naming ``label_path`` when the label is not on the image's voxel grid."""
    if image.shape != label.shape:
        raise DataError(f"{label_path}: shape {label.shape} differs from the image's {image.shape} (z, y, x)")
    checks = (
        ("spacing", image.spacing, label.spacing, SPACING_TOL_MM),
        ("origin", image.origin, label.origin, ORIGIN_TOL_MM),
        ("direction", image.direction, label.direction, DIRECTION_TOL),
    )
    for name, expected, seen, tol in checks:
        if not np.allclose(expected, seen, rtol=0.0, atol=tol):
            raise DataError(
                f"{label_path}: {name} {_fmt(seen)} differs from the image's {_fmt(expected)} "
                f"(tolerance {tol:g}); resample the label onto the image grid"
            )


def check_hounsfield(array: np.ndarray, image_path: Path) -> tuple[float, float]:
    """Return the image's (min, max); raise DataError when it does not look like CT in Hounsfield units."""
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise DataError(f"{image_path}: every voxel is {low:g}; the image is blank")
    if low > AIR_HU:
        raise DataError(
            f"{image_path}: values {low:g}..{high:g} do not look like CT in Hounsfield units (no air near -1000; "
            "MR, normalised or raw scanner values?)"
        )
    if low < HU_MIN or high > HU_MAX:
        raise DataError(
            f"{image_path}: values {low:g}..{high:g} outside the plausible CT range {HU_MIN:g}..{HU_MAX:g} HU"
        )
    return low, high


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"
