"""Turn an unpacked archive into a dataset folder fedseg reads, with its ``labels.toml``.

* ``msd``: the archive's task folder (the one holding ``dataset.json``, ``imagesTr/``, ``labelsTr/``) is the
  dataset, moved as it is; macOS ``._`` files are never unpacked.
* ``totalsegmentator``: ``sNNNN/ct.nii.gz`` becomes ``images/sNNNN.nii.gz``; the binary masks the entry names
  (``sNNNN/segmentations/<mask>.nii.gz``) are combined into ``labels/sNNNN.nii.gz`` with the entry's label values
  (TotalSegmentator's own v2 numbering, so the built-in ``totalsegmentator`` manifest reads them too); the
  institution table (``meta.csv``) is kept. The other structures' masks are never unpacked.
* ``kits``: ``case_NNNNN/imaging.nii.gz`` and ``segmentation.nii.gz`` become ``images/`` and ``labels/`` pairs.

Files are moved (renamed), not copied. The result is checked with :func:`~fedseg.common.data.layouts.discover_cases`
before the caller renames it into place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import tomli_w
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedseg.common.console import console
from fedseg.common.data.io import Volume, read_volume, write_volume
from fedseg.common.data.layouts import discover_cases
from fedseg.common.data.manifest import GLOBAL_CLASSES, SITE_MANIFEST, LabelManifest
from fedseg.common.datasets.extract import Wanted
from fedseg.common.datasets.registry import DatasetEntry
from fedseg.common.errors import DataError

log = logging.getLogger(__name__)

_KITS_FILES = ("imaging.nii.gz", "segmentation.nii.gz")
_SEARCH_DEPTH = 3


def wanted_members(entry: DatasetEntry) -> Wanted:
    """Which archive members the entry's layout needs (everything but macOS ``._`` files, for MSD)."""
    masks = {f"{stem}.nii.gz" for stem in entry.masks.values()}
    table = PurePosixPath(entry.institution.file).name if entry.institution else None

    def wanted(path: PurePosixPath) -> bool:
        if any(part.startswith("._") for part in path.parts):
            return False
        if entry.layout == "msd":
            return True
        if entry.layout == "kits":
            return path.name in _KITS_FILES or path.name.endswith(".json")
        in_masks = len(path.parts) > 1 and path.parts[-2] == "segmentations" and path.name in masks
        return path.name == "ct.nii.gz" or in_masks or path.name == table

    return wanted


def arrange(entry: DatasetEntry, unpacked: Path, dest: Path) -> int:
    """Build the dataset folder ``dest`` (absent) from the ``unpacked`` archive; returns its labelled cases.

    Raises:
        DataError: the unpacked files are not in the entry's layout (the message says what is missing).
    """
    if entry.layout == "msd":
        os.rename(_msd_root(unpacked), dest)
    elif entry.layout == "kits":
        _arrange_kits(unpacked, dest)
    else:
        _arrange_totalsegmentator(entry, unpacked, dest)
    write_manifest(entry, dest)
    cases = [c for c in discover_cases(dest) if c.label is not None]
    if entry.cases is not None and len(cases) != entry.cases:
        log.warning("%s: %d labelled cases, the registry says %d", entry.name, len(cases), entry.cases)
    return len(cases)


def write_manifest(entry: DatasetEntry, dest: Path) -> None:
    """``dest/labels.toml``: the entry's label values and the organs it annotates."""
    title = f"{entry.name} ({entry.title or entry.name}), written by fed-eval datasets fetch"
    write_labels_toml(entry.manifest(), dest, title, "here")


def write_labels_toml(manifest: LabelManifest, dest: Path, title: str, where: str) -> None:
    """``dest/labels.toml`` of ``manifest``, headed by ``title`` and, for a partial annotation, which organs are
    unlabelled ``where``."""
    body = {
        "site": manifest.site,
        "annotated": list(manifest.annotated),
        "other_labels": manifest.other_labels,
        "labels": {str(v): name for v, name in sorted(manifest.labels.items())},
    }
    header = f"# Label manifest of {title}.\n"
    missing = [o for o in GLOBAL_CLASSES[1:] if o not in manifest.annotated]
    if missing:
        header += f"# Partial annotation: {', '.join(missing)} are unlabelled (0) {where}, not background.\n"
    (dest / SITE_MANIFEST).write_text(header + tomli_w.dumps(body), encoding="utf-8")


def _msd_root(unpacked: Path) -> Path:
    roots = sorted({p.parent for p in _find(unpacked, "dataset.json")})
    if len(roots) != 1:
        found = "none" if not roots else ", ".join(str(r.relative_to(unpacked)) for r in roots)
        raise DataError(f"the archive is not one MSD task: expected one folder with dataset.json, found {found}")
    return roots[0]


def _arrange_kits(unpacked: Path, dest: Path) -> None:
    cases = sorted(p.parent for p in _find(unpacked, _KITS_FILES[0]) if (p.parent / _KITS_FILES[1]).is_file())
    if not cases:
        raise DataError("the archive holds no KiTS case (case_NNNNN/imaging.nii.gz with segmentation.nii.gz)")
    for folder in ("images", "labels"):
        (dest / folder).mkdir(parents=True)
    for case in cases:
        os.rename(case / _KITS_FILES[0], dest / "images" / f"{case.name}.nii.gz")
        os.rename(case / _KITS_FILES[1], dest / "labels" / f"{case.name}.nii.gz")
    for extra in sorted(unpacked.glob("*/*.json")) + sorted(unpacked.glob("*.json")):
        os.rename(extra, dest / extra.name)


def _arrange_totalsegmentator(entry: DatasetEntry, unpacked: Path, dest: Path) -> None:
    cases = sorted(p.parent for p in _find(unpacked, "ct.nii.gz") if (p.parent / "segmentations").is_dir())
    if not cases:
        raise DataError("the archive holds no TotalSegmentator case (sNNNN/ct.nii.gz with segmentations/)")
    for folder in ("images", "labels"):
        (dest / folder).mkdir(parents=True)
    columns = (TextColumn("combining masks"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        for case in progress.track(cases):
            write_volume(_combined_masks(case / "segmentations", entry.masks), dest / "labels" / f"{case.name}.nii.gz")
            os.rename(case / "ct.nii.gz", dest / "images" / f"{case.name}.nii.gz")
    if entry.institution is not None:
        tables = list(_find(unpacked, PurePosixPath(entry.institution.file).name))
        if tables:
            os.rename(tables[0], dest / entry.institution.file)
        else:
            log.warning("%s: no %s in the archive; by-source splits will not work", entry.name, entry.institution.file)


def _combined_masks(folder: Path, masks: dict[int, str]) -> Volume:
    """One label map from binary masks: voxel = the value of the mask that covers it (0 where none does)."""
    combined: Volume | None = None
    label: np.ndarray | None = None
    for value, stem in sorted(masks.items()):
        mask = read_volume(folder / f"{stem}.nii.gz")
        if combined is None or label is None:
            combined, label = mask, np.zeros(mask.shape, np.uint8)
        elif mask.shape != combined.shape:
            raise DataError(f"{folder / stem}.nii.gz: shape {mask.shape} differs from the case's other masks")
        label[mask.array != 0] = value
    assert combined is not None and label is not None  # masks is never empty (the registry checks it)
    return combined.with_array(label)


def _find(root: Path, name: str) -> Iterator[Path]:
    """Files called ``name`` at most :data:`_SEARCH_DEPTH` folders below ``root``."""
    for depth in range(_SEARCH_DEPTH + 1):
        yield from (p for p in root.glob("/".join(["*"] * depth + [name])) if p.is_file())
