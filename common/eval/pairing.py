"""Pair prediction files with reference files by case id.

``pred`` and ``ref`` are NIfTI files or folders. In folders, cases are matched by case id: the file name with the
``.nii`` / ``.nii.gz`` suffix removed (``case_001.nii.gz`` pairs with ``case_001.nii``), and on the prediction side
also without ``fed-eval predict``'s ``_seg`` suffix (``case_001_seg.nii.gz`` pairs with ``case_001.nii.gz``). When a
prediction folder holds ``*_seg`` files, only those are label maps (``_prob_*`` and attention maps are ignored);
non-NIfTI files are always ignored. A prediction without a reference is an error; a reference without a prediction
is skipped with a warning and listed in :attr:`EvaluationReport.missing_predictions`, so a partial prediction run is
visible but usable. A single prediction file may also be paired with its case in a reference folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedseg.common.data.io import is_nifti
from fedseg.common.errors import ConfigError, DataError

#: Suffix ``fed-eval predict`` gives label maps (``<case>_seg.nii.gz``); stripped when pairing predictions.
PRED_SUFFIX = "_seg"


@dataclass(frozen=True)
class CasePair:
    """A prediction file and its reference file."""

    case_id: str
    pred: Path
    ref: Path


def case_name(path: Path) -> str:
    """The case id of a NIfTI path: its file name without ``.nii`` / ``.nii.gz``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def match_cases(pred: Path, ref: Path) -> tuple[list[CasePair], list[Path]]:
    """Pair prediction and reference files by case id (see the module docstring for the naming rules).

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
        return [CasePair(pred_case_id(pred, {case_name(ref)}), pred, ref)], []
    if pred.is_dir() and ref.is_file():
        raise ConfigError(f"--pred {pred} is a folder but --ref {ref} is a file; give two files or two folders")
    refs = _nifti_by_case(ref)
    preds = _prediction_files(pred, set(refs)) if pred.is_dir() else {pred_case_id(pred, set(refs)): pred}
    pairs = []
    for case_id, pred_path in sorted(preds.items()):
        if case_id not in refs:
            raise DataError(
                f"{pred_path}: no reference for case {case_id} in {ref} (expected {case_id}.nii or {case_id}.nii.gz); "
                "check --ref, or leave this prediction out"
            )
        pairs.append(CasePair(case_id, pred_path, refs[case_id]))
    missing = [path for case_id, path in sorted(refs.items()) if case_id not in preds] if pred.is_dir() else []
    return pairs, missing


def pred_case_id(path: Path, ref_ids: set[str]) -> str:
    """The case id of a prediction file: its name without suffix and without ``_seg`` (unless a reference has it)."""
    name = case_name(path)
    if name.endswith(PRED_SUFFIX) and name not in ref_ids:
        return name[: -len(PRED_SUFFIX)]
    return name


def _prediction_files(folder: Path, ref_ids: set[str]) -> dict[str, Path]:
    """Case id -> label map in a prediction folder; only ``*_seg`` files when there are any."""
    files = _nifti_files(folder)
    segs = [p for p in files if case_name(p).endswith(PRED_SUFFIX)]
    return _by_case(folder, segs or files, lambda path: pred_case_id(path, ref_ids))


def _nifti_by_case(folder: Path) -> dict[str, Path]:
    """Map case id -> NIfTI file in ``folder`` (not recursive; other entries ignored)."""
    return _by_case(folder, _nifti_files(folder), case_name)


def _nifti_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and is_nifti(p)]


def _by_case(folder: Path, files: list[Path], case_of: Callable[[Path], str]) -> dict[str, Path]:
    """Case id -> file; a case id twice or no file at all is a one-line :class:`DataError`."""
    found: dict[str, Path] = {}
    for path in files:
        case_id = case_of(path)
        if case_id in found:
            raise DataError(f"{path}: case {case_id} appears twice (also {found[case_id].name}); keep one")
        found[case_id] = path
    if not found:
        raise DataError(f"{folder}: folder holds no NIfTI files (.nii, .nii.gz); check the path")
    return found
