"""``split``: write a fetched dataset's virtual hospitals (the plan of :mod:`fedseg.common.datasets.partition`).

Written under ``OUT/``: ``site-1/`` ... ``site-N/`` and ``validation/``, each an MSD-layout folder
(``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``labels.toml``) that ``fed-client check`` and ``fed-client
join`` read, plus ``split.json`` (the plan, the seed, how each file was placed). Images, and the labels of sites
that annotate every organ, are hard links to the fetched files where possible (:mod:`fedseg.common.datasets.links`);
a ``by-organ`` site's labels are written anew with the organs it does not annotate set to 0, and its
``labels.toml`` lists only its organ under ``annotated``, which is how fedseg marks a partially labelled site.
Everything is written into a hidden sibling ``.OUT.split`` first and renamed to ``OUT`` when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedseg.common.console import console
from fedseg.common.data.io import read_volume, write_volume
from fedseg.common.data.layouts import CaseFiles, case_stem, discover_cases
from fedseg.common.data.manifest import SITE_MANIFEST, LabelManifest, load_manifest
from fedseg.common.datasets.arrange import write_labels_toml
from fedseg.common.datasets.fetch import PROVENANCE
from fedseg.common.datasets.links import place
from fedseg.common.datasets.partition import SplitPlan, SplitRequest, plan_split
from fedseg.common.datasets.registry import DatasetEntry
from fedseg.common.datasets.sources import read_institutions
from fedseg.common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: The split's record, in ``OUT``.
SPLIT_RECORD = "split.json"


@dataclass(frozen=True)
class SplitResult:
    """A written split: its folder, plan, how many files each placement method got, label files rewritten."""

    out: Path
    plan: SplitPlan
    placed: dict[str, int]
    relabelled: int


def split_dataset(entry: DatasetEntry, data: Path, out: Path, request: SplitRequest) -> SplitResult:
    """Split the fetched ``entry`` found under ``data`` into ``out`` (absent or empty) as ``request`` says.

    ``request.case_ids`` and ``request.organs`` are filled from the dataset folder and its manifest.

    Raises:
        ConfigError: ``out`` is not empty, or the request does not fit the dataset (see ``plan_split``).
        DataError: no fetched dataset under ``data``, an unreadable dataset folder or institution table.
    """
    folder = locate(entry, data)
    manifest = _manifest(entry, folder)
    cases = {c.case_id: c for c in discover_cases(folder) if c.label is not None}
    institutions = None
    if request.scheme == "by-source" and entry.institution is not None:
        institutions = read_institutions(folder, entry.institution)
    full = SplitRequest(entry.name, sorted(cases), manifest.annotated, request.sites, request.scheme, request.seed,
                        request.val_fraction)  # fmt: skip
    plan = plan_split(full, institutions)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: output folder is not empty; choose a new --out or delete it")
    staging = out.parent / f".{out.name}.split"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as err:
        raise DataError(f"{out}: cannot write here ({err.strerror or err}); pick another --out") from None
    try:
        result = _write(entry, manifest, cases, plan, staging, request.val_fraction)
        if out.exists():
            out.rmdir()  # empty (checked above): the rename takes its place
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SplitResult(out, plan, result[0], result[1])


def locate(entry: DatasetEntry, data: Path) -> Path:
    """The fetched dataset folder: ``data/<name>`` or ``data`` itself (the one holding fetch's provenance file).

    Raises:
        DataError: neither holds the dataset (the message says how to fetch it).
    """
    for folder in (data / entry.name, data):
        if (folder / PROVENANCE).is_file():
            return folder
    if (data / entry.name).is_dir():
        return data / entry.name
    raise DataError(
        f"{data}: no fetched {entry.name} here (expected {data / entry.name}); "
        f"run fed-eval datasets fetch {entry.name} --out {data}"
    )


def _manifest(entry: DatasetEntry, folder: Path) -> LabelManifest:
    path = folder / SITE_MANIFEST
    return load_manifest(path) if path.is_file() else entry.manifest()


def _write(
    entry: DatasetEntry,
    manifest: LabelManifest,
    cases: dict[str, CaseFiles],
    plan: SplitPlan,
    out: Path,
    val_fraction: float,
) -> tuple[dict[str, int], int]:
    placed: Counter[str] = Counter()
    relabelled = 0
    groups = [(site.name, site.cases, site.annotated) for site in plan.sites]
    if plan.validation:
        groups.append(("validation", plan.validation, tuple(manifest.annotated)))
    columns = (TextColumn("writing sites"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("split", total=sum(len(g[1]) for g in groups))
        for name, ids, annotated in groups:
            site_manifest = _site_manifest(manifest, name, annotated)
            for case_id in ids:
                relabelled += _place_case(cases[case_id], out / name, manifest, site_manifest, placed)
                progress.advance(task)
            _write_site_files(entry, out / name, [cases[i] for i in ids], site_manifest)
    record = {
        "dataset": entry.name,
        "licence": entry.licence,
        "citation": entry.citation,
        "val_fraction": val_fraction,
        "placed": dict(placed),
        "relabelled_labels": relabelled,
        **asdict(plan),
    }
    (out / SPLIT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return dict(placed), relabelled


def _site_manifest(manifest: LabelManifest, site: str, annotated: Sequence[str]) -> LabelManifest:
    """The dataset's manifest restricted to the organs ``site`` annotates."""
    labels = {v: name for v, name in manifest.labels.items() if name in annotated or name == "background"}
    return LabelManifest(site=site, labels=labels, annotated=list(annotated), other_labels=manifest.other_labels)


def _place_case(
    case: CaseFiles, folder: Path, manifest: LabelManifest, site: LabelManifest, placed: Counter[str]
) -> int:
    """Link (or copy) the case's image and label into ``folder``; returns 1 when the label had to be rewritten."""
    assert case.label is not None  # only labelled cases are split
    if case.image.is_dir():
        raise DataError(f"{case.image}: a DICOM folder; split datasets of NIfTI files (fed-eval datasets fetch does)")
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    image = folder / "imagesTr" / _file_name(case.case_id, case.image)
    placed[f"images {place(case.image, image)}"] += 1
    label = folder / "labelsTr" / _file_name(case.case_id, case.label)
    if set(site.annotated) == set(manifest.annotated):
        placed[f"labels {place(case.label, label)}"] += 1
        return 0
    source = read_volume(case.label)
    keep = [v for v, name in site.labels.items() if name != "background"]
    write_volume(source.with_array(np.where(np.isin(source.array, keep), source.array, 0)), label)
    placed["labels rewritten"] += 1
    return 1


def _write_site_files(entry: DatasetEntry, folder: Path, cases: list[CaseFiles], site: LabelManifest) -> None:
    """``dataset.json`` (MSD ``training`` list) and ``labels.toml`` of one site folder."""
    training = [
        {
            "image": f"./imagesTr/{_file_name(c.case_id, c.image)}",
            "label": f"./labelsTr/{_file_name(c.case_id, c.label)}",
        }
        for c in cases
    ]
    meta = {
        "name": f"{entry.name}-{site.site}",
        "description": f"{site.site} of a fed-eval datasets split of {entry.name} ({entry.title})",
        "licence": entry.licence,
        "reference": entry.citation,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background"} | {str(v): n for v, n in sorted(site.labels.items()) if n != "background"},
        "numTraining": len(training),
        "training": training,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    write_labels_toml(site, folder, f"{site.site}, split from {entry.name} by fed-eval datasets split", "at this site")


def _file_name(case_id: str, path: Path | None) -> str:
    """``<case id><the source's suffix>`` (``.nii.gz`` or ``.nii``)."""
    assert path is not None
    return case_id + path.name[len(case_stem(path)) :]
