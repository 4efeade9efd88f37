"""``fed-eval predict``: outputs in the input's exact geometry (NIfTI and DICOM), attention export, errors."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.cli.predict import input_warning, predict_file
from fedseg.common.data.io import read_volume
from fedseg.common.data.manifest import GLOBAL_CLASSES
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.checkpoint import CheckpointMeta, config_hash, load_checkpoint, save_checkpoint
from fedseg.common.nn.model import ModelConfig, build_model

runner = CliRunner()


def _checkpoint(path: Path, arch: str = "attention-unet") -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"arch": arch, "feature_scale": 16})
    preprocess = PreprocessConfig()
    meta = CheckpointMeta(
        model=cfg,
        class_names=GLOBAL_CLASSES,
        preprocess=preprocess,
        patch_size=(32, 64, 64),
        config_hash=config_hash(model=cfg, preprocess=preprocess),
        seed=0,
    )
    return save_checkpoint(path, build_model(cfg), meta)


@pytest.fixture(scope="module")
def att_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "att.pt")


def assert_same_geometry(out: Path, reference: sitk.Image) -> None:
    image = sitk.ReadImage(str(out))
    assert image.GetSize() == reference.GetSize()
    assert image.GetDimension() == 3
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """Write ``image`` as a CT DICOM series, one file per slice, with full geometry tags."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(
        f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
    )
    series_uid = "1.2.826.0.1.3680043.2.1125.1." + str(int(time.time()))
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0008|0060": "CT",
            "0020|000e": series_uid,
            "0020|000d": series_uid + ".0",
            "0008|0018": f"{series_uid}.{z + 1}",
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slice_)


def test_predict_real_ct_keeps_geometry_and_writes_probabilities(
    att_checkpoint: Path, real_ct_path: Path, tmp_path: Path
) -> None:
    result = runner.invoke(
        app,
        [
            "predict",
            "--model",
            str(att_checkpoint),
            "--input",
            str(real_ct_path),
            "--out",
            str(tmp_path),
            "--probabilities",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    reference = sitk.ReadImage(str(real_ct_path))
    seg = tmp_path / "ct_seg.nii.gz"
    assert_same_geometry(seg, reference)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    assert labels.dtype == np.uint8 and labels.max() < len(GLOBAL_CLASSES)
    probs = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"ct_prob_{n}.nii.gz"))) for n in GLOBAL_CLASSES]
    for name in GLOBAL_CLASSES:
        assert_same_geometry(tmp_path / f"ct_prob_{name}.nii.gz", reference)
    stacked = np.stack(probs)
    assert stacked.min() >= 0.0 and stacked.max() <= 1.0


def test_predict_dicom_series_with_tta_keeps_geometry_and_exports_attention(
    att_checkpoint: Path, real_ct_path: Path, tmp_path: Path
) -> None:
    ct = sitk.ReadImage(str(real_ct_path))[20:84, 10:70, 5:17]  # 64 x 60 x 12 crop, same direction
    write_dicom_series(ct, tmp_path / "series")
    reference = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "predict",
            "--model",
            str(att_checkpoint),
            "--input",
            str(tmp_path / "series"),
            "--out",
            str(out),
            "--attention",
            "--tta",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert_same_geometry(out / "series_seg.nii.gz", reference)
    for gate in ("att2", "att3", "att4"):
        path = out / f"series_{gate}.nii.gz"
        assert_same_geometry(path, reference)
        alpha = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        assert alpha.dtype == np.float32 and alpha.min() >= 0.0 and alpha.max() <= 1.0
    png = out / "series_attention.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_folder_of_nifti_files(
    att_checkpoint: Path, synthetic_nifti: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    image_path, _ = synthetic_nifti
    for name in ("a.nii.gz", "b.nii"):
        sitk.WriteImage(sitk.ReadImage(str(image_path)), str(folder / name))
    result = runner.invoke(
        app, ["predict", "--model", str(att_checkpoint), "--input", str(folder), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    for stem in ("a", "b"):
        assert_same_geometry(tmp_path / "o" / f"{stem}_seg.nii.gz", sitk.ReadImage(str(image_path)))


def _invoke(model: Path, input_path: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = runner.invoke(
        app, ["predict", "--model", str(model), "--input", str(input_path), "--out", str(out), *extra]
    )
    return result.exit_code, " ".join(result.output.split())


def test_predict_missing_checkpoint(real_ct_path: Path, tmp_path: Path) -> None:
    code, output = _invoke(tmp_path / "missing.pt", real_ct_path, tmp_path)
    assert code == 1
    assert "error:" in output and "missing.pt does not exist" in output


def test_predict_wrong_model_file(real_ct_path: Path, tmp_path: Path) -> None:
    code, output = _invoke(real_ct_path, real_ct_path, tmp_path)
    assert code == 1
    assert "is not a readable fedseg checkpoint" in output


def test_predict_unreadable_inputs(att_checkpoint: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    code, output = _invoke(att_checkpoint, text, tmp_path / "o")
    assert code == 1 and "is not a NIfTI file" in output
    code, output = _invoke(att_checkpoint, tmp_path / "nothing.nii.gz", tmp_path / "o")
    assert code == 1 and "no such file or folder" in output
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    code, output = _invoke(att_checkpoint, broken, tmp_path / "o")
    assert code == 1 and "broken.nii.gz" in output
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    code, output = _invoke(att_checkpoint, empty, tmp_path / "o")
    assert code == 1 and "no DICOM series" in output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_predict_cuda_requested_but_absent(att_checkpoint: Path, real_ct_path: Path, tmp_path: Path) -> None:
    code, output = _invoke(att_checkpoint, real_ct_path, tmp_path, "--device", "cuda")
    assert code == 1 and "CUDA is not available" in output


def test_predict_attention_needs_attention_unet(real_ct_path: Path, tmp_path: Path) -> None:
    unet = _checkpoint(tmp_path / "unet.pt", arch="unet")
    code, output = _invoke(unet, real_ct_path, tmp_path, "--attention")
    assert code == 1 and "--attention needs an attention-unet checkpoint" in output


def test_input_warning_for_label_maps_and_non_ct(real_ct_path: Path, real_labels_path: Path) -> None:
    ct = read_volume(real_ct_path)
    assert input_warning(ct, real_ct_path) is None  # int16 HU -1100..1207
    labels = read_volume(real_labels_path)
    n_values = len(np.unique(labels.array))
    assert input_warning(labels, real_labels_path) == (
        f"{real_labels_path}: looks like a label map ({n_values} distinct whole values 0..{labels.array.max()}), "
        "not a CT; check --input"
    )
    shifted = ct.with_array(ct.array.astype(np.float32) + 1100.0)  # e.g. raw scanner values without the offset
    assert input_warning(shifted, real_ct_path) == (
        f"{real_ct_path}: values 0..2307 do not look like CT in Hounsfield units (no air near -1000; "
        "MR, normalised or raw scanner values?)"
    )


def test_predict_warns_on_a_label_map_and_still_predicts(
    att_checkpoint: Path, real_labels_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crop = tmp_path / "labels.nii.gz"  # a 16 x 32 x 32 piece of the real label map keeps the test fast
    sitk.WriteImage(sitk.ReadImage(str(real_labels_path))[40:72, 30:62, 8:24], str(crop))
    model, meta = load_checkpoint(att_checkpoint)
    with caplog.at_level(logging.WARNING, logger="fedseg.common.cli.predict"):
        result = predict_file(model, meta, crop, tmp_path, torch.device("cpu"))
    assert [r.getMessage() for r in caplog.records] == [f"{input_warning(read_volume(crop), crop)}; predicting anyway"]
    assert "looks like a label map" in caplog.records[0].getMessage()
    assert [f.name for f in result.files] == ["labels_seg.nii.gz"]


def test_predict_model_help_names_server_checkpoints() -> None:
    result = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    assert "fed-server's OUTPUT_DIR/checkpoints/best.pt" in text and "fed-eval train's OUT/best.pt" in text
