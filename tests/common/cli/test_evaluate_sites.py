"""`fed-eval evaluate` as a site uses it: label manifests, flipped converters, predict's file names, 80 columns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.data.manifest import load_manifest
from fedseg.common.eval.evaluation import LabelSchemes, evaluate

runner = CliRunner()
#: TotalSegmentator value -> global class index, written out by hand (1 pancreas, 2 spleen, 3 kidney, 4 liver).
TOTALSEG_TO_GLOBAL = {1: 2, 2: 3, 3: 3, 5: 4, 7: 1}


def invoke(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["evaluate", *(str(a) for a in args)])
    return result.exit_code, result.stdout, " ".join(result.stderr.split())


def global_copy(labels_path: Path, out: Path) -> Path:
    """The real label map renumbered to global classes by hand (other structures -> 0), same geometry."""
    image = sitk.ReadImage(str(labels_path))
    source = sitk.GetArrayFromImage(image)
    target = np.zeros_like(source)
    for value, index in TOTALSEG_TO_GLOBAL.items():
        target[source == value] = index
    result = sitk.GetImageFromArray(target)
    result.CopyInformation(image)
    sitk.WriteImage(result, str(out))
    return out


def flipped_y(labels_path: Path, out: Path, shift_mm: float = 0.0) -> Path:
    """The same label map stored flipped along y: same physical voxels (unless ``shift_mm`` moves them)."""
    image = sitk.ReadImage(str(labels_path))
    array = sitk.GetArrayFromImage(image)[:, ::-1, :].copy()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + direction[:, 1] * (image.GetSpacing()[1] * (image.GetSize()[1] - 1))
    direction[:, 1] *= -1
    result = sitk.GetImageFromArray(array)
    result.SetSpacing(image.GetSpacing())
    result.SetDirection(tuple(direction.ravel()))
    result.SetOrigin(tuple(origin + np.array([0.0, shift_mm, 0.0])))
    sitk.WriteImage(result, str(out))
    return out


def test_labels_manifest_maps_references_like_training(real_labels_path: Path, tmp_path: Path) -> None:
    pred = global_copy(real_labels_path, tmp_path / "ct_seg.nii.gz")
    code, stdout, _ = invoke("--pred", pred, "--ref", real_labels_path, "--labels", "totalsegmentator", "--json", "-")
    assert code == 0
    summary = json.loads(stdout)["summary"]
    assert list(summary) == ["pancreas", "spleen", "kidney", "liver"]
    assert all(summary[name]["dice"]["mean"] == 1.0 for name in summary)
    # without the manifest the numbers do not line up: spleen (global 2) is scored against kidney_right (2)
    code, stdout, _ = invoke("--pred", pred, "--ref", real_labels_path, "--json", "-")
    assert code == 0 and json.loads(stdout)["summary"]["spleen"]["dice"]["mean"] < 0.1


def test_pred_labels_for_predictions_in_another_scheme(real_labels_path: Path, tmp_path: Path) -> None:
    ref = global_copy(real_labels_path, tmp_path / "ct.nii.gz")
    code, stdout, _ = invoke(
        "--pred", real_labels_path, "--ref", ref, "--pred-labels", "totalsegmentator", "--json", "-"
    )
    assert code == 0
    assert [s["dice"]["mean"] for s in json.loads(stdout)["summary"].values()] == [1.0, 1.0, 1.0, 1.0]


def test_predictions_in_another_scheme_without_pred_labels_are_said_in_one_line(
    real_labels_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref = global_copy(real_labels_path, tmp_path / "ct.nii.gz")
    with caplog.at_level(logging.WARNING):
        report = evaluate(real_labels_path, ref)  # TotalSegmentator values scored as if they were fedseg's
    assert report.summary[4].metrics["dice"].mean < 0.5  # the silent failure: liver is TotalSegmentator's 5 here
    (warning,) = [r.getMessage() for r in caplog.records if "pass --pred-labels" in r.getMessage()]
    assert "label values the scored classes do not have (5, " in warning and "\n" not in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluate(ref, ref)
    assert not [r for r in caplog.records if "pass --pred-labels" in r.getMessage()]


def test_labels_manifest_scores_only_annotated_classes(real_labels_path: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "labels.toml"
    manifest.write_text('annotated = ["pancreas"]\nother_labels = "background"\n[labels]\n"7" = "pancreas"\n')
    pred = global_copy(real_labels_path, tmp_path / "ct_seg.nii.gz")
    code, stdout, _ = invoke("--pred", pred, "--ref", real_labels_path, "--labels", manifest)
    assert code == 0
    assert "1 pancreas" in stdout and "spleen" not in stdout and "liver" not in stdout


def test_classes_with_labels_is_one_line_error(real_labels_path: Path) -> None:
    code, _, stderr = invoke(
        "--pred", real_labels_path, "--ref", real_labels_path, "--labels", "totalsegmentator", "--classes", "1=x"
    )
    assert code == 1
    assert stderr == "error: --classes cannot be combined with --labels/--pred-labels; the manifest decides the classes"


def test_unknown_label_value_names_the_file(real_labels_path: Path) -> None:
    code, _, stderr = invoke("--pred", real_labels_path, "--ref", real_labels_path, "--labels", "phantom")
    assert code == 1
    assert stderr.startswith(f"error: {real_labels_path}: label values 5, 6, 7")
    assert stderr.endswith('map them in the manifest\'s labels table or set other_labels = "background"')


def test_real_ct_flipped_along_y_is_reoriented_and_said(
    real_labels_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pred = flipped_y(real_labels_path, tmp_path / "ct_seg.nii.gz")
    assert not np.array_equal(  # on disk the arrays really differ
        sitk.GetArrayFromImage(sitk.ReadImage(str(pred))), sitk.GetArrayFromImage(sitk.ReadImage(str(real_labels_path)))
    )
    manifest = load_manifest("totalsegmentator")
    with caplog.at_level(logging.INFO, logger="fedseg.common.eval.evaluation"):
        evaluate(pred, real_labels_path, schemes=LabelSchemes(ref=manifest, pred=manifest))  # before the CLI
    assert caplog.messages == [
        f"{pred}: same voxels as the reference in another orientation; reoriented (flipped y), no interpolation"
    ]
    code, stdout, _ = invoke(
        "--pred", pred, "--ref", real_labels_path, "--labels", "totalsegmentator", "--pred-labels", "totalsegmentator",
        "--json", "-",
    )  # fmt: skip
    assert code == 0
    assert [s["dice"]["mean"] for s in json.loads(stdout)["summary"].values()] == [1.0, 1.0, 1.0, 1.0]


def test_half_voxel_shift_still_needs_resampling(real_labels_path: Path, tmp_path: Path) -> None:
    pred = flipped_y(real_labels_path, tmp_path / "ct_seg.nii.gz", shift_mm=1.5)
    code, _, stderr = invoke("--pred", pred, "--ref", real_labels_path)
    assert code == 1
    assert stderr == (
        f"error: {pred}: origin (x, y, z) (177.956, -309.819, 94.3018) differs from reference {real_labels_path} "
        "(177.956, -11.319, 94.3018); resample the prediction onto the reference grid"
    )


def test_predict_file_names_pair_with_references(tmp_path: Path, real_labels_path: Path) -> None:
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "labelsTr"
    ref_dir.mkdir()
    pred_dir.mkdir()
    global_copy(real_labels_path, ref_dir / "case_7.nii.gz")
    global_copy(real_labels_path, pred_dir / "case_7_seg.nii.gz")
    global_copy(real_labels_path, pred_dir / "case_7_prob_liver.nii.gz")  # other predict outputs are not cases
    global_copy(real_labels_path, pred_dir / "case_7_att3.nii.gz")
    code, stdout, _ = invoke("--pred", pred_dir, "--ref", ref_dir, "--json", "-")
    assert code == 0
    report = json.loads(stdout)
    assert [(c["case"], Path(c["pred"]).name) for c in report["cases"]] == [("case_7", "case_7_seg.nii.gz")]


@pytest.mark.parametrize("many_digits", [False, True])
def test_summary_table_fits_80_columns_in_plain_output(
    real_labels_path: Path, tmp_path: Path, many_digits: bool
) -> None:
    pred = flipped_y(real_labels_path, tmp_path / "ct_seg.nii.gz") if many_digits else real_labels_path
    labels = ["--classes", "1=spleen_with_a_long_name,2=kidney_right,3=kidney_left"] if many_digits else []
    ref = global_copy(real_labels_path, tmp_path / "ct.nii.gz") if many_digits else real_labels_path
    code, stdout, _ = invoke("--pred", pred, "--ref", ref, *labels)
    assert code == 0
    lines = stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in stdout and "\x1b" not in stdout and "─" not in stdout  # nothing cut, no colour, ASCII rules
    assert "HD95 mm" in stdout or ("HD95" in stdout and "mm" in stdout)
