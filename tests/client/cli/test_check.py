"""`fed-client check` and the site check behind it: usable/skipped cases, one-line reasons naming the file, exits."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from fedseg.client.cli.main import app
from fedseg.common.data.io import Volume, write_volume
from fedseg.common.data.layouts import CaseFiles
from fedseg.common.data.manifest import default_manifest
from fedseg.common.data.sitecheck import check_site

SIZE = 16
SPACING = (2.0, 1.5, 1.5)
ORIGIN = (-12.0, 8.0, 4.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
DATA_DIR = Path(__file__).parents[2] / "data"

runner = CliRunner()


def _image_array() -> np.ndarray:
    """Air (-1000 HU) around a soft-tissue block (40 HU, seeded noise)."""
    rng = np.random.default_rng(0)
    image = np.full((SIZE, SIZE, SIZE), -1000, dtype=np.int16)
    image[2:14, 2:14, 2:14] = 40 + rng.integers(-20, 20, size=(12, 12, 12))
    return image


def _label_array() -> np.ndarray:
    """Four organs, values 1..4 (the identity manifest's numbering)."""
    label = np.zeros((SIZE, SIZE, SIZE), dtype=np.uint8)
    label[3:6, 3:6, 3:6] = 1
    label[3:6, 8:12, 3:6] = 2
    label[8:12, 3:6, 8:12] = 3
    label[8:12, 8:12, 8:12] = 4
    return label


def _vol(
    array: np.ndarray, spacing: tuple[float, float, float] = SPACING, origin: tuple[float, float, float] = ORIGIN
) -> Volume:
    return Volume(array, spacing, origin, IDENTITY)


def _write_case(root: Path, case_id: str, image: Volume | None = None, label: Volume | None = None) -> None:
    write_volume(image or _vol(_image_array()), root / "images" / f"{case_id}.nii.gz")
    write_volume(label or _vol(_label_array()), root / "labels" / f"{case_id}.nii.gz")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A plain images/+labels/ site with one good 16³ case, ``good``."""
    root = tmp_path / "site"
    _write_case(root, "good")
    return root


def _run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["check", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


# --- bad cases: each (root) -> path of the file the reason must name, and a phrase of the reason -------------


def _zero_byte(root: Path) -> Path:
    _write_case(root, "bad")
    (root / "images/bad.nii.gz").write_bytes(b"")
    return root / "images/bad.nii.gz"


def _truncated(root: Path) -> Path:
    _write_case(root, "bad")
    path = root / "images/bad.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_file(root: Path) -> Path:
    _write_case(root, "bad")
    (root / "labels/bad.nii.gz").write_text("label: pancreas\n")
    return root / "labels/bad.nii.gz"


def _two_d(root: Path) -> Path:
    _write_case(root, "bad")
    sitk.WriteImage(sitk.GetImageFromArray(_image_array()[0]), str(root / "images/bad.nii.gz"))
    return root / "images/bad.nii.gz"


def _four_d(root: Path) -> Path:
    _write_case(root, "bad")
    frame = _vol(_image_array()).to_sitk()
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(root / "images/bad.nii.gz"))
    return root / "images/bad.nii.gz"


def _shape_mismatch(root: Path) -> Path:
    _write_case(root, "bad", label=_vol(_label_array()[:, :, :12]))
    return root / "labels/bad.nii.gz"


def _spacing_mismatch(root: Path) -> Path:
    _write_case(root, "bad", label=_vol(_label_array(), spacing=(2.0, 1.5, 1.6)))
    return root / "labels/bad.nii.gz"


def _origin_mismatch(root: Path) -> Path:
    _write_case(root, "bad", label=_vol(_label_array(), origin=(-12.0, 8.5, 4.0)))
    return root / "labels/bad.nii.gz"


def _float_labels(root: Path) -> Path:
    _write_case(root, "bad", label=_vol(_label_array().astype(np.float32) * 0.5))
    return root / "labels/bad.nii.gz"


def _unknown_values(root: Path) -> Path:
    label = _label_array()
    label[0, 0, :3] = (9, 17, 9)
    _write_case(root, "bad", label=_vol(label))
    return root / "labels/bad.nii.gz"


def _nan_voxels(root: Path) -> Path:
    image = _image_array().astype(np.float32)
    image[0, 0, :5] = np.nan
    _write_case(root, "bad", image=_vol(image))
    return root / "images/bad.nii.gz"


def _mr_like(root: Path) -> Path:
    rng = np.random.default_rng(1)
    _write_case(root, "bad", image=_vol(rng.random((SIZE, SIZE, SIZE), dtype=np.float32)))
    return root / "images/bad.nii.gz"


def _constant(root: Path) -> Path:
    _write_case(root, "bad", image=_vol(np.full((SIZE, SIZE, SIZE), -1000, dtype=np.int16)))
    return root / "images/bad.nii.gz"


def _out_of_range(root: Path) -> Path:
    image = _image_array().astype(np.int32)
    image[0, 0, 0] = 30000
    _write_case(root, "bad", image=_vol(image))
    return root / "images/bad.nii.gz"


def _empty_label(root: Path) -> Path:
    _write_case(root, "bad", label=_vol(np.zeros((SIZE, SIZE, SIZE), np.uint8)))
    return root / "labels/bad.nii.gz"


def _no_label(root: Path) -> Path:
    write_volume(_vol(_image_array()), root / "images/bad.nii.gz")
    return root / "images/bad.nii.gz"


BAD_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "zero-byte file": (_zero_byte, "file is empty"),
    "truncated .nii.gz": (_truncated, "truncated"),
    "text file named .nii.gz": (_text_file, "not a gzip-compressed NIfTI"),
    "2D image": (_two_d, "2D image"),
    "4D image": (_four_d, "4D image"),
    "shape mismatch": (_shape_mismatch, "shape (16, 16, 12) differs from the image's (16, 16, 16)"),
    "spacing mismatch": (_spacing_mismatch, "spacing (2, 1.5, 1.6) differs"),
    "origin mismatch": (_origin_mismatch, "origin (-12, 8.5, 4) differs"),
    "float labels": (_float_labels, "non-integer values 0.5, 1.5"),
    "unknown label values": (_unknown_values, "label values 9, 17 are not in the label manifest"),
    "NaN voxels": (_nan_voxels, "5 NaN/infinite voxels"),
    "MR-like 0..1 image": (_mr_like, "do not look like CT in Hounsfield units"),
    "constant image": (_constant, "every voxel is -1000"),
    "out-of-range values": (_out_of_range, "outside the plausible CT range"),
    "empty label": (_empty_label, "none of the annotated classes"),
    "no label file": (_no_label, "no label file"),
}


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_case_is_skipped_with_reason_naming_the_file(kind: str, site: Path) -> None:
    make, phrase = BAD_CASES[kind]
    bad_file = make(site)
    code, stdout, _ = _run(str(site), "--json")
    assert code == 0  # one usable case left: skips are warnings
    report = json.loads(stdout)
    assert [case["case_id"] for case in report["usable"]] == ["good"]
    ((case_id, reason),) = [(s["case_id"], s["reason"]) for s in report["skipped"]]
    assert case_id == "bad"
    assert reason.startswith(f"{bad_file}: ")
    assert phrase in reason
    assert "\n" not in reason


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_site_with_only_bad_cases_exits_1_with_one_line(kind: str, tmp_path: Path) -> None:
    root = tmp_path / "site"
    make, phrase = BAD_CASES[kind]
    bad_file = make(root)
    code, stdout, stderr = _run(str(root))
    assert code == 1
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert f"no usable case in {root}" in line
    assert str(bad_file) in line and phrase in line
    assert "Traceback" not in stdout + stderr
    assert "Skipped cases" in stdout and "0 of 1 cases usable" in stdout


# --- folder-level problems: exit 1, one line --------------------------------------------------------------


def _empty_folder(root: Path) -> str:
    root.mkdir()
    return f"{root}: dataset folder is empty"


def _dataset_json_missing(root: Path) -> str:
    write_volume(_vol(_image_array()), root / "imagesTr/a.nii.gz")
    write_volume(_vol(_label_array()), root / "labelsTr/a.nii.gz")
    return f"{root / 'dataset.json'}: missing"


def _dataset_json_inconsistent(root: Path) -> str:
    _dataset_json_missing(root)
    entries = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("a", "b")]
    (root / "dataset.json").write_text(json.dumps({"training": entries}))
    return f"{root / 'dataset.json'}: lists ./imagesTr/b.nii.gz but"


def _dataset_json_invalid(root: Path) -> str:
    _dataset_json_missing(root)
    (root / "dataset.json").write_text("{not json")
    return f"{root / 'dataset.json'}: invalid JSON"


def _missing_folder(root: Path) -> str:
    return f"{root}: no such dataset folder"


BAD_FOLDERS = {
    "empty folder": _empty_folder,
    "dataset.json missing": _dataset_json_missing,
    "dataset.json inconsistent": _dataset_json_inconsistent,
    "dataset.json invalid": _dataset_json_invalid,
    "missing folder": _missing_folder,
}


@pytest.mark.parametrize("kind", list(BAD_FOLDERS))
@pytest.mark.parametrize("as_json", [False, True])
def test_bad_folder_exits_1_with_one_line(kind: str, as_json: bool, tmp_path: Path) -> None:
    root = tmp_path / "site"
    expected = BAD_FOLDERS[kind](root)
    code, stdout, stderr = _run(str(root), *(["--json"] if as_json else []))
    assert code == 1
    assert stderr.strip().splitlines()[-1].startswith(f"error: {expected}")
    assert "Traceback" not in stdout + stderr
    if as_json:
        assert json.loads(stdout)["error"].startswith(expected)


def test_unreadable_manifest_is_one_line(site: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[labels]\n"1" = "heart"\n')
    code, _, stderr = _run(str(site), "--labels", str(tmp_path / "bad.toml"))
    assert code == 1
    assert stderr.strip().startswith(
        f"error: {tmp_path / 'bad.toml'}: labels: Value error, unknown global class 'heart'"
    )


# --- good sites -------------------------------------------------------------------------------------------


def test_good_site_table_and_exit_0(site: Path) -> None:
    code, stdout, _ = _run(str(site))
    assert code == 0
    assert "Usable cases" in stdout and "16×16×16" in stdout and "1 of 1 cases usable" in stdout
    assert "Skipped cases" not in stdout


def test_site_manifest_file_is_used_by_default(site: Path) -> None:
    label = _label_array() * 10  # values 10, 20, 30, 40
    _write_case(site, "good", label=_vol(label))
    assert _run(str(site))[0] == 1  # identity mapping does not know 10..40
    (site / "labels.toml").write_text('[labels]\n"10" = "pancreas"\n"20" = "spleen"\n"30" = "kidney"\n"40" = "liver"\n')
    code, stdout, _ = _run(str(site), "--json")
    assert code == 0
    counts = json.loads(stdout)["usable"][0]["class_voxels"]
    assert counts == {"background": 4096 - 27 - 36 - 48 - 64, "pancreas": 27, "spleen": 36, "kidney": 48, "liver": 64}


def test_missing_annotated_class_is_a_note_not_a_skip(site: Path) -> None:
    label = _label_array()
    label[label == 1] = 0
    _write_case(site, "good", label=_vol(label))
    code, stdout, _ = _run(str(site), "--json")
    assert code == 0
    assert json.loads(stdout)["usable"][0]["missing"] == ["pancreas"]


def test_real_ct_site_passes_with_its_manifest(tmp_path: Path, real_ct_path: Path, real_labels_path: Path) -> None:
    root = tmp_path / "real"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copy(real_ct_path, root / "images/ct.nii.gz")
    shutil.copy(real_labels_path, root / "labels/ct.nii.gz")
    code, stdout, _ = _run(str(root), "--labels", str(DATA_DIR / "labels.toml"), "--json")
    assert code == 0
    (case,) = json.loads(stdout)["usable"]
    assert case["shape"] == [30, 101, 122] and case["spacing"] == [3.0, 3.0, 3.0]
    assert case["hu_range"] == [-1100.0, 1207.0]
    assert case["class_voxels"] == {
        "background": 30 * 101 * 122 - 644 - 9452 - 3947 - 3676 - 38634,
        "pancreas": 644,
        "spleen": 9452,
        "kidney": 3947 + 3676,
        "liver": 38634,
    }


def test_check_site_reads_each_file_once(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedseg.common.data.sitecheck as sitecheck

    seen: list[Path] = []
    original = sitecheck.read_volume

    def counting(path: str | Path) -> Volume:
        seen.append(Path(path))
        return original(path)

    monkeypatch.setattr(sitecheck, "read_volume", counting)
    _write_case(site, "second")
    report = check_site(site, default_manifest())
    assert [c.case_id for c in report.usable] == ["good", "second"]
    assert sorted(seen) == sorted({site / f"{d}/{c}.nii.gz" for d in ("images", "labels") for c in ("good", "second")})
    assert report.usable[0] == CaseFiles("good", site / "images/good.nii.gz", site / "labels/good.nii.gz")


def test_table_marks_classes_the_site_does_not_annotate(site: Path) -> None:
    (site / "labels.toml").write_text(
        'annotated = ["pancreas", "liver"]\n[labels]\n"1" = "pancreas"\n"2" = "spleen"\n"3" = "kidney"\n"4" = "liver"\n'
    )
    code, stdout, _ = _run(str(site))
    assert code == 0
    (row,) = [line for line in stdout.splitlines() if line.strip().startswith("good")]
    assert row.split()[4:8] == ["27", "–", "–", "64"]
    assert "not annotated at this site" in stdout
