"""`fed-eval evaluate` and fedseg.common.eval.evaluation: case pairing, checks, reports and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.errors import ConfigError, DataError
from fedseg.common.eval.evaluation import parse_classes
from fedseg.common.eval.pairing import case_name, match_cases

SPACING_XYZ = (0.8, 0.8, 2.5)
runner = CliRunner()


def write_labels(
    path: Path,
    array: np.ndarray,
    spacing_xyz: tuple[float, float, float] = SPACING_XYZ,
    origin: tuple[float, float, float] = (-10.0, 20.0, 5.0),
) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def reference() -> np.ndarray:
    """(8, 8, 8) map: class 1 a 4x4x4 box (64 voxels), class 2 a 2x2x2 box (8 voxels)."""
    ref = np.zeros((8, 8, 8), dtype=np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[6:8, 0:2, 0:2] = 2
    return ref


def prediction() -> np.ndarray:
    """Class 1 shifted one slice in z (overlap 48 of 64 + 64: Dice 0.75); class 2 missed entirely."""
    pred = np.zeros((8, 8, 8), dtype=np.uint8)
    pred[3:7, 2:6, 2:6] = 1
    return pred


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """pred/ and ref/ with case_001 (shifted, .nii vs .nii.gz) and case_002 (perfect)."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    write_labels(ref_dir / "case_001.nii.gz", reference())
    write_labels(pred_dir / "case_001.nii", prediction())
    write_labels(ref_dir / "case_002.nii.gz", reference())
    write_labels(pred_dir / "case_002.nii.gz", reference())
    (pred_dir / "plans.json").write_text("{}")  # non-NIfTI files are ignored
    return pred_dir, ref_dir


def invoke(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["evaluate", *(str(a) for a in args)])
    return result.exit_code, result.stdout, " ".join(result.stderr.split())


def test_evaluate_folders_writes_json_and_csv(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, ref_dir = folders
    json_path, csv_path = tmp_path / "report.json", tmp_path / "rows.csv"
    code, stdout, _ = invoke(
        "--pred", pred_dir, "--ref", ref_dir, "--classes", "1=organ, 2=small", "--json", json_path, "--csv", csv_path
    )
    assert code == 0
    assert "1 organ" in stdout and "2 small" in stdout and "2 case(s)" in stdout
    report = json.loads(json_path.read_text())
    assert [c["case"] for c in report["cases"]] == ["case_001", "case_002"]
    organ = report["cases"][0]["classes"]["organ"]
    assert organ["dice"] == pytest.approx(0.75) and organ["precision"] == pytest.approx(0.75)
    # shifted 4^3 box: 2 * (4 * 0.8 + 16 * 2.5) / 112 mm (see test_metrics), HD95 one slice = 2.5 mm
    assert organ["assd"] == pytest.approx(86.4 / 112, rel=1e-5) and organ["hd95"] == pytest.approx(2.5, rel=1e-5)
    small = report["cases"][0]["classes"]["small"]
    assert small["dice"] == 0.0 and small["precision"] is None and small["empty"] == "pred_empty"
    summary = report["summary"]["organ"]
    assert summary["dice"]["mean"] == pytest.approx(0.875) and summary["dice"]["n"] == 2
    assert report["summary"]["small"]["n_pred_empty"] == 1 and report["summary"]["small"]["assd"]["n"] == 1
    assert report["missing_predictions"] == []
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert rows[1]["class"] == "small" and rows[1]["precision"] == "" and rows[1]["empty"] == "pred_empty"


def test_evaluate_json_to_stdout_prints_only_json(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    code, stdout, stderr = invoke("--pred", pred_dir, "--ref", ref_dir, "--json", "-")
    assert code == 0
    report = json.loads(stdout)  # nothing but JSON on stdout
    assert list(report["classes"].values()) == ["pancreas", "spleen", "kidney", "liver"]  # default classes
    assert report["summary"]["pancreas"]["dice"]["mean"] == pytest.approx(0.875)
    assert report["summary"]["liver"]["n_both_empty"] == 2 and report["summary"]["liver"]["dice"]["n"] == 0
    assert "1 pancreas" in stderr and "HD95" in stderr  # the table went to stderr


def test_evaluate_single_files_and_file_in_folder(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    code, stdout, _ = invoke("--pred", pred_dir / "case_002.nii.gz", "--ref", ref_dir / "case_002.nii.gz")
    assert code == 0 and "1 case(s)" in stdout and "1.000" in stdout
    code, stdout, _ = invoke("--pred", pred_dir / "case_001.nii", "--ref", ref_dir)
    assert code == 0 and "1 case(s)" in stdout


def test_evaluate_reference_without_prediction_warns_and_skips(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    write_labels(ref_dir / "case_003.nii.gz", reference())
    code, stdout, stderr = invoke("--pred", pred_dir, "--ref", ref_dir, "--json", "-")
    assert code == 0
    assert "1 reference case(s) have no prediction and are skipped: case_003.nii.gz" in stderr
    assert json.loads(stdout)["missing_predictions"] == [str(ref_dir / "case_003.nii.gz")]


def test_evaluate_prediction_without_reference_fails(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    write_labels(pred_dir / "case_004.nii.gz", reference())
    code, _, stderr = invoke("--pred", pred_dir, "--ref", ref_dir)
    assert code == 1
    assert stderr == (
        f"error: {pred_dir / 'case_004.nii.gz'}: no reference for case case_004 in {ref_dir} "
        "(expected case_004.nii or case_004.nii.gz); check --ref, or leave this prediction out"
    )


@pytest.mark.parametrize(
    ("kwargs", "shape", "expected"),
    [
        ({"spacing_xyz": (0.8, 0.8, 2.0)}, (8, 8, 8), "spacing (z, y, x) (2, 0.8, 0.8) differs from reference"),
        ({"origin": (-10.0, 20.0, 7.5)}, (8, 8, 8), "origin (x, y, z) (-10, 20, 7.5) differs from reference"),
        ({}, (8, 8, 9), "shape (z, y, x) (8, 8, 9) differs from reference"),
    ],
)
def test_evaluate_geometry_mismatch_fails(
    tmp_path: Path, kwargs: dict[str, tuple[float, float, float]], shape: tuple[int, int, int], expected: str
) -> None:
    ref = write_labels(tmp_path / "ref.nii.gz", reference())
    pred = write_labels(tmp_path / "pred.nii.gz", np.zeros(shape, dtype=np.uint8), **kwargs)
    code, _, stderr = invoke("--pred", pred, "--ref", ref)
    assert code == 1
    assert f"error: {pred}: {expected} {ref}" in stderr


def test_evaluate_tolerates_tiny_geometry_differences(tmp_path: Path) -> None:
    ref = write_labels(tmp_path / "ref.nii.gz", reference())
    pred = write_labels(tmp_path / "pred.nii.gz", reference(), origin=(-10.0002, 20.0, 5.0))
    assert invoke("--pred", pred, "--ref", ref)[0] == 0


def test_evaluate_non_integer_labels_fail_but_whole_floats_pass(tmp_path: Path) -> None:
    ref = write_labels(tmp_path / "ref.nii.gz", reference())
    whole = write_labels(tmp_path / "whole.nii.gz", reference().astype(np.float32))
    assert invoke("--pred", whole, "--ref", ref)[0] == 0
    soft = reference().astype(np.float32)
    soft[0, 0, 0] = 0.5
    pred = write_labels(tmp_path / "soft.nii.gz", soft)
    code, _, stderr = invoke("--pred", pred, "--ref", ref)
    assert code == 1
    assert f"{pred}: non-integer label value 0.5; labels must be whole numbers" in stderr


def test_evaluate_unreadable_file_fails(tmp_path: Path) -> None:
    ref = write_labels(tmp_path / "ref.nii.gz", reference())
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a nifti file at all")
    code, _, stderr = invoke("--pred", broken, "--ref", ref)
    assert code == 1
    assert f"error: {broken}:" in stderr and "gzip" in stderr


def test_evaluate_missing_path_fails(tmp_path: Path) -> None:
    ref = write_labels(tmp_path / "ref.nii.gz", reference())
    code, _, stderr = invoke("--pred", tmp_path / "nope", "--ref", ref)
    assert code == 1
    assert f"{tmp_path / 'nope'}: no such file or folder" in stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1:spleen", "--classes entry '1:spleen' is not <label>=<name>"),
        ("one=spleen", "--classes entry 'one=spleen' is not <label>=<name>"),
        ("1=", "--classes entry '1=' is not <label>=<name>"),
        ("1=spleen,1=liver", "--classes repeats '1=liver'"),
    ],
)
def test_evaluate_bad_classes_fail(folders: tuple[Path, Path], text: str, expected: str) -> None:
    pred_dir, ref_dir = folders
    code, _, stderr = invoke("--pred", pred_dir, "--ref", ref_dir, "--classes", text)
    assert code == 1
    assert expected in stderr


def test_parse_classes_and_case_names() -> None:
    assert parse_classes(" 1 = spleen,4=liver ") == {1: "spleen", 4: "liver"}
    with pytest.raises(ConfigError):
        parse_classes("")
    assert case_name(Path("a/case_001.nii.gz")) == "case_001"
    assert case_name(Path("case_001.NII")) == "case_001"


def test_match_cases_rejects_folder_vs_file_duplicates_and_empty(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, ref_dir = folders
    with pytest.raises(ConfigError, match="is a folder but --ref"):
        match_cases(pred_dir, ref_dir / "case_001.nii.gz")
    write_labels(pred_dir / "case_002.nii", reference())
    with pytest.raises(DataError, match="case case_002 appears twice"):
        match_cases(pred_dir, ref_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no NIfTI files"):
        match_cases(tmp_path / "empty", ref_dir)
