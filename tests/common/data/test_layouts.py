"""discover_cases: MSD, nnU-Net v1/v2 raw and images/+labels/ layouts, and one-line errors for broken folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedseg.common.data.layouts import CaseFiles, case_stem, discover_cases
from fedseg.common.errors import DataError


def _touch(root: Path, *names: str) -> None:
    """Create empty files (discovery never opens them)."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def _dataset_json(root: Path, content: object) -> None:
    (root / "dataset.json").write_text(json.dumps(content))


def _msd(root: Path, cases: list[str]) -> None:
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]
    _dataset_json(root, {"name": "Pancreas", "modality": {"0": "CT"}, "numTraining": len(cases), "training": training})
    _touch(root, *(f"imagesTr/{c}.nii.gz" for c in cases), *(f"labelsTr/{c}.nii.gz" for c in cases))


def _nnunet_v2(root: Path, cases: list[str], **extra: object) -> None:
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "pancreas": 1}, "numTraining": len(cases)}
    _dataset_json(root, {**meta, "file_ending": ".nii.gz", **extra})
    _touch(root, *(f"imagesTr/{c}_0000.nii.gz" for c in cases), *(f"labelsTr/{c}.nii.gz" for c in cases))


# --- recognised layouts -----------------------------------------------------------------------------------


def test_msd_layout_follows_dataset_json_and_ignores_hidden_files(tmp_path: Path) -> None:
    _msd(tmp_path, ["pancreas_004", "pancreas_001"])
    _touch(tmp_path, "imagesTr/._pancreas_001.nii.gz", "imagesTs/pancreas_002.nii.gz")
    assert discover_cases(tmp_path) == [
        CaseFiles("pancreas_001", tmp_path / "imagesTr/pancreas_001.nii.gz", tmp_path / "labelsTr/pancreas_001.nii.gz"),
        CaseFiles("pancreas_004", tmp_path / "imagesTr/pancreas_004.nii.gz", tmp_path / "labelsTr/pancreas_004.nii.gz"),
    ]


def test_nnunet_v1_lists_images_without_channel_suffix(tmp_path: Path) -> None:
    training = [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}]
    _dataset_json(tmp_path, {"modality": {"0": "CT"}, "training": training})
    _touch(tmp_path, "imagesTr/la_003_0000.nii.gz", "labelsTr/la_003.nii.gz")
    (case,) = discover_cases(tmp_path)
    assert case == CaseFiles("la_003", tmp_path / "imagesTr/la_003_0000.nii.gz", tmp_path / "labelsTr/la_003.nii.gz")


def test_nnunet_v2_raw_layout(tmp_path: Path) -> None:
    _nnunet_v2(tmp_path, ["case_b", "case_a"])
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["case_a", "case_b"]
    assert cases[0].image == tmp_path / "imagesTr/case_a_0000.nii.gz"
    assert cases[0].label == tmp_path / "labelsTr/case_a.nii.gz"


def test_plain_pairs_match_by_name_and_accept_dicom_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _touch(tmp_path, "images/a.nii.gz", "labels/a.nii.gz", "images/b.nii", "labels/b.nii.gz")
    _touch(tmp_path, "images/c/slice001.dcm", "labels/c.nii.gz", "images/d.nii.gz", "labels/orphan.nii.gz")
    _touch(tmp_path, "images/notes.txt")
    with caplog.at_level(logging.WARNING):
        cases = discover_cases(tmp_path)
    assert cases == [
        CaseFiles("a", tmp_path / "images/a.nii.gz", tmp_path / "labels/a.nii.gz"),
        CaseFiles("b", tmp_path / "images/b.nii", tmp_path / "labels/b.nii.gz"),
        CaseFiles("c", tmp_path / "images/c", tmp_path / "labels/c.nii.gz"),
        CaseFiles("d", tmp_path / "images/d.nii.gz", None),
    ]
    assert "orphan.nii.gz" in caplog.text


@pytest.mark.parametrize(("name", "stem"), [("x.nii.gz", "x"), ("x.NII.GZ", "x"), ("x.nii", "x"), ("dicom", "dicom")])
def test_case_stem(name: str, stem: str) -> None:
    assert case_stem(Path(name)) == stem


# --- broken folders ---------------------------------------------------------------------------------------


def _empty(root: Path) -> None:
    _touch(root, ".DS_Store")


def _unknown(root: Path) -> None:
    _touch(root, "scans/a.nii.gz")


def _missing_json(root: Path) -> None:
    _touch(root, "imagesTr/a.nii.gz", "labelsTr/a.nii.gz")


def _invalid_json(root: Path) -> None:
    _touch(root, "imagesTr/a.nii.gz", "labelsTr/a.nii.gz")
    (root / "dataset.json").write_text('{"training": [')


def _lists_missing_image(root: Path) -> None:
    _msd(root, ["a", "b"])
    (root / "imagesTr/b.nii.gz").unlink()


def _lists_missing_label(root: Path) -> None:
    _msd(root, ["a", "b"])
    (root / "labelsTr/a.nii.gz").unlink()


def _training_not_list(root: Path) -> None:
    _dataset_json(root, {"training": "imagesTr"})


def _multi_channel_json(root: Path) -> None:
    _nnunet_v2(root, ["a"], channel_names={"0": "T1", "1": "T2"})


def _multi_channel_files(root: Path) -> None:
    training = [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]
    _dataset_json(root, {"training": training})
    _touch(root, "imagesTr/a_0000.nii.gz", "imagesTr/a_0001.nii.gz", "labelsTr/a.nii.gz")


def _nnunet_missing_label(root: Path) -> None:
    _nnunet_v2(root, ["a", "b"])
    (root / "labelsTr/b.nii.gz").unlink()


def _nnunet_count_mismatch(root: Path) -> None:
    _nnunet_v2(root, ["a", "b"], numTraining=3)


def _no_images(root: Path) -> None:
    _touch(root, "images/readme.txt", "labels/a.nii.gz")


BROKEN = {
    "empty folder": (_empty, "", "dataset folder is empty"),
    "unknown layout": (_unknown, "", "unknown dataset layout"),
    "dataset.json missing": (_missing_json, "dataset.json", "missing"),
    "dataset.json invalid": (_invalid_json, "dataset.json", "invalid JSON"),
    "lists missing image": (_lists_missing_image, "dataset.json", "imagesTr/b.nii.gz does not exist"),
    "lists missing label": (_lists_missing_label, "dataset.json", "labelsTr/a.nii.gz does not exist"),
    "training not a list": (_training_not_list, "dataset.json", "'training' must be a list"),
    "multi-channel dataset.json": (_multi_channel_json, "dataset.json", "2 channels"),
    "multi-channel files": (_multi_channel_files, "imagesTr/a_0001.nii.gz", "multi-channel"),
    "nnU-Net missing label": (_nnunet_missing_label, "labelsTr/b.nii.gz", "missing label"),
    "nnU-Net numTraining": (_nnunet_count_mismatch, "dataset.json", "numTraining is 3"),
    "no images": (_no_images, "", "no images found"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_folder_raises_one_line_naming_the_path(kind: str, tmp_path: Path) -> None:
    make, where, expected = BROKEN[kind]
    make(tmp_path)
    with pytest.raises(DataError) as info:
        discover_cases(tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path / where) if where else str(tmp_path))
    assert expected in message
    assert "\n" not in message


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such dataset folder"):
        discover_cases(tmp_path / "absent")
