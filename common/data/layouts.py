"""Find the image/label pairs of a site's dataset folder, whatever common layout it uses.

Recognised layouts, tried in this order:

* **Medical Segmentation Decathlon** (and nnU-Net v1): ``dataset.json`` with a ``"training"`` list of
  ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``. When a listed image is absent but
  ``x_0000.nii.gz`` exists (nnU-Net v1 lists images without the channel suffix) that file is used.
* **nnU-Net v2 raw**: ``dataset.json`` without ``"training"`` (it has ``channel_names`` and ``file_ending``),
  images ``imagesTr/<case>_0000.nii.gz``, labels ``labelsTr/<case>.nii.gz``.
* **Plain pairs**: ``images/`` and ``labels/`` holding files matched by name (``images/a.nii.gz`` with
  ``labels/a.nii.gz``); a sub-folder of ``images/`` is a DICOM series whose label is ``labels/<folder>.nii.gz``.

Only single-channel (CT) datasets are accepted: a second channel (``_0001``) raises :class:`DataError`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.common.data.io import NIFTI_SUFFIXES, is_nifti
from fedseg.common.errors import DataError

log = logging.getLogger(__name__)

_CHANNEL = "_0000"


@dataclass(frozen=True)
class CaseFiles:
    """One case of a dataset: its id, its image (file or DICOM folder) and its label map, if any."""

    case_id: str
    image: Path
    label: Path | None


def discover_cases(root: str | Path) -> list[CaseFiles]:
    """List the cases of a dataset folder, sorted by case id.

    Args:
        root: the dataset folder (MSD, nnU-Net raw, or images/ + labels/ layout; see the module docstring).

    Returns:
        One :class:`CaseFiles` per image; ``label`` is None for plain-layout images without a label file.

    Raises:
        DataError: missing or empty folder, unknown layout, dataset.json missing where required, invalid or
            listing files that do not exist, or a multi-channel dataset. The message names the path.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder; check the path")
    if not any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise DataError(f"{root}: dataset folder is empty; copy the images and labels into it")
    if (root / "dataset.json").is_file():
        cases = _from_dataset_json(root)
    elif (root / "imagesTr").is_dir():
        raise DataError(
            f"{root / 'dataset.json'}: missing; an imagesTr/labelsTr dataset (MSD or nnU-Net) needs it "
            "(or rename the folders to images/ and labels/)"
        )
    elif (root / "images").is_dir():
        cases = _plain_pairs(root)
    else:
        raise DataError(
            f"{root}: unknown dataset layout; expected dataset.json + imagesTr/ + labelsTr/ (MSD or nnU-Net) "
            "or images/ + labels/"
        )
    if not cases:
        raise DataError(f"{root}: no images found in the dataset; check the folder")
    return sorted(cases, key=lambda case: case.case_id)


def case_stem(path: Path) -> str:
    """File name without ``.nii`` / ``.nii.gz`` (folders keep their name)."""
    name = path.name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _from_dataset_json(root: Path) -> list[CaseFiles]:
    """Cases of an MSD / nnU-Net v1 (``"training"`` list) or nnU-Net v2 dataset."""
    meta = _load_dataset_json(root / "dataset.json")
    if "training" in meta:
        return _msd_cases(root, meta["training"])
    return _nnunet_v2_cases(root, meta)


def _load_dataset_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: invalid JSON ({err}); fix or regenerate dataset.json") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: must be a JSON object with a 'training' list or nnU-Net 'channel_names'")
    channels = meta.get("channel_names", meta.get("modality", {"0": "CT"}))
    if isinstance(channels, dict) and len(channels) > 1:
        raise DataError(
            f"{path}: dataset has {len(channels)} channels {sorted(channels.values())}; fedseg needs single-channel CT"
        )
    return meta


def _msd_cases(root: Path, training: object) -> list[CaseFiles]:
    """Cases listed in an MSD ``"training"`` list; every listed file must exist."""
    where = root / "dataset.json"
    if not isinstance(training, list):
        raise DataError(f"{where}: 'training' must be a list of {{'image': ..., 'label': ...}} entries")
    cases = []
    for entry in training:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DataError(f"{where}: training entry {entry!r} needs an 'image' path")
        image = _msd_image(root, entry["image"])
        label = entry.get("label")
        label_path = root / label if isinstance(label, str) else None
        if label_path is not None and not label_path.exists():
            raise DataError(f"{where}: lists {label} but {label_path} does not exist; fix dataset.json")
        cases.append(CaseFiles(case_stem(image).removesuffix(_CHANNEL), image, label_path))
    return cases


def _msd_image(root: Path, listed: str) -> Path:
    """The image file for a listed path, accepting nnU-Net v1's implicit ``_0000`` channel suffix."""
    path = root / listed
    if path.exists():
        return path
    stem = case_stem(path)
    channel0 = path.with_name(stem + _CHANNEL + path.name[len(stem) :])
    if channel0.exists():
        _reject_second_channel(channel0)
        return channel0
    raise DataError(f"{root / 'dataset.json'}: lists {listed} but {path} does not exist; fix dataset.json")


def _nnunet_v2_cases(root: Path, meta: dict[str, Any]) -> list[CaseFiles]:
    """Cases of an nnU-Net v2 raw dataset: ``imagesTr/<case>_0000<ending>`` and ``labelsTr/<case><ending>``."""
    where = root / "dataset.json"
    ending = meta.get("file_ending", ".nii.gz")
    if "channel_names" not in meta or ending not in NIFTI_SUFFIXES:
        raise DataError(
            f"{where}: neither an MSD 'training' list nor an nnU-Net v2 dataset.json with NIfTI 'file_ending'"
        )
    cases = []
    for image in _visible(root / "imagesTr", f"*{_CHANNEL}{ending}"):
        _reject_second_channel(image)
        case_id = image.name[: -len(_CHANNEL + ending)]
        label = root / "labelsTr" / f"{case_id}{ending}"
        if not label.is_file():
            raise DataError(f"{label}: missing label for {image.name}; nnU-Net raw datasets label every image")
        cases.append(CaseFiles(case_id, image, label))
    expected = meta.get("numTraining")
    if isinstance(expected, int) and expected != len(cases):
        raise DataError(f"{where}: numTraining is {expected} but imagesTr/ holds {len(cases)} cases; fix it")
    return cases


def _reject_second_channel(channel0: Path) -> None:
    second = channel0.with_name(channel0.name.replace(_CHANNEL, "_0001", 1))
    if second.exists():
        raise DataError(f"{second}: multi-channel case; fedseg trains on single-channel CT only")


def _plain_pairs(root: Path) -> list[CaseFiles]:
    """Match ``images/<name>`` with ``labels/<name>.nii[.gz]``; images without a label get ``label=None``."""
    labels = {case_stem(p): p for p in _visible(root / "labels", "*") if is_nifti(p)}
    cases = []
    for image in _visible(root / "images", "*"):
        if not (is_nifti(image) or image.is_dir()):
            log.debug("ignoring %s: neither NIfTI nor a DICOM folder", image)
            continue
        case_id = case_stem(image)
        cases.append(CaseFiles(case_id, image, labels.pop(case_id, None)))
    for case_id, orphan in sorted(labels.items()):
        log.warning("%s: label without an image (no images/%s.*); ignored", orphan, case_id)
    return cases


def _visible(folder: Path, pattern: str) -> list[Path]:
    """Entries of ``folder`` matching ``pattern``, skipping hidden files such as macOS ``._x.nii.gz``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))
