"""``fed-eval export``'s bad inputs get one red line and exit 1; a failed export leaves nothing behind."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.export import exporter
from fedseg.common.export.parity import Parity

runner = CliRunner()


def _export(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["export", *args])
    return result.exit_code, result.output


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def test_a_file_that_is_not_a_checkpoint(ct_file: Path, tmp_path: Path) -> None:
    code, output = _export("--model", str(ct_file), "--format", "onnx", "--out", str(tmp_path / "o"))
    assert code == 1
    assert "ct.nii.gz is not a readable fedseg checkpoint" in _one_error_line(output)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_format(small_checkpoint: Path, tmp_path: Path) -> None:
    code, output = _export("--model", str(small_checkpoint), "--format", "tensorrt", "--out", str(tmp_path / "o"))
    assert code == 1
    assert _one_error_line(output) == "error: --format 'tensorrt' is not one of torchscript, onnx, bundle"


def test_an_output_folder_that_exists_is_never_touched(small_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = _export("--model", str(small_checkpoint), "--format", "torchscript", "--out", str(out))
    assert code == 1
    assert "already exists; pass a new folder" in _one_error_line(output)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_export_packages_name_the_extra(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    code, output = _export("--model", str(small_checkpoint), "--format", "onnx", "--out", str(tmp_path / "o"))
    assert code == 1
    line = _one_error_line(" ".join(output.split()))
    assert line == 'error: --format onnx needs onnxscript, which is not installed; run: pip install "fedseg[export]"'


def test_a_check_image_that_is_missing_or_not_nifti_for_a_bundle(small_checkpoint: Path, tmp_path: Path) -> None:
    args = ["--model", str(small_checkpoint), "--out", str(tmp_path / "o")]
    code, output = _export(*args, "--format", "onnx", "--check", str(tmp_path / "nothing.nii.gz"))
    assert code == 1 and "--check" in _one_error_line(output) and "no such file or folder" in output
    dicom = tmp_path / "series"
    dicom.mkdir()
    code, output = _export(*args, "--format", "bundle", "--check", str(dicom))
    assert code == 1
    assert "a bundle is checked on a NIfTI file" in _one_error_line(" ".join(output.split()))


def test_an_export_that_fails_midway_leaves_no_folder(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = exporter.WRITERS["torchscript"]

    def half_then_crash(*args: object) -> object:
        real(*args)  # type: ignore[arg-type]
        raise OSError("disk full")

    monkeypatch.setitem(exporter.WRITERS, "torchscript", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        exporter.export(small_checkpoint, "torchscript", tmp_path / "o")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its hidden staging sibling


def test_parity_that_is_missed_exits_1_after_writing(
    small_checkpoint: Path, ct_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def poor(*args: object) -> Parity:
        return Parity("TorchScript", (15, 50, 61), 3e-3, 0.9990, 1.0, 1.0)

    monkeypatch.setattr(exporter, "measure", poor)
    out = tmp_path / "o"
    args = ["--model", str(small_checkpoint), "--format", "torchscript", "--out", str(out), "--check", str(ct_file)]
    code, output = _export(*args)
    assert code == 1
    assert "| NO" in output
    flat = " ".join(output.split())
    assert "error: " in flat and "written, but parity not reached (max abs diff 3.00e-03, agreement 99.9000 %)" in flat
    assert (out / "model.ts").is_file()
