"""``fed-eval export --format bundle``: a MONAI bundle that MONAI alone runs, and that agrees with fed-eval predict."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.data.io import read_volume
from fedseg.common.export.bundlecheck import geometry_difference, run_bundle
from fedseg.common.synthetic.phantoms import generate_phantoms

runner = CliRunner()


@pytest.fixture(scope="module")
def export_run(small_checkpoint: Path, ct_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bundle") / "fedseg_bundle"
    args = ["export", "--model", str(small_checkpoint), "--format", "bundle", "--out", str(out)]
    result = runner.invoke(app, [*args, "--check", str(ct_file)])
    assert result.exit_code == 0, result.output
    return out, " ".join(result.stdout.split())


@pytest.fixture(scope="module")
def inputs(ct_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CT and two phantoms from sites scanning differently (site 3 writes RAS, 5 mm slices)."""
    root = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(root / "data", sites=3, cases_per_site=1, val_cases=0, size=(32, 32, 32))
    folder = root / "in"
    folder.mkdir()
    shutil.copy(ct_file, folder / "real_ct.nii.gz")
    for site in ("site-1", "site-3"):
        (image,) = (root / "data" / site / "imagesTr").iterdir()
        shutil.copy(image, folder / image.name)
    return folder


def test_the_export_runs_the_bundle_and_reports_its_agreement(export_run: tuple[Path, str]) -> None:
    _, stdout = export_run
    assert "Bundle (MONAI alone) vs fed-eval predict (fp32), on the input's grid" in stdout
    for organ in ("pancreas", "spleen", "kidney", "liver"):  # seed 3 predicts all four on the real CT
        assert f" {organ} " in stdout
    assert "geometry | | | same | yes" in stdout
    assert " NO " not in stdout


def test_the_bundle_holds_the_specifications_files(export_run: tuple[Path, str]) -> None:
    out, _ = export_run
    for name in (
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.ts",
        "docs/README.md",
        "MODEL_CARD.md",
    ):
        assert (out / name).is_file(), name
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors"):
        assert meta[key], key
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "pancreas", "2": "spleen", "3": "kidney", "4": "liver"}
    assert pred["num_channels"] == 5 and pred["spatial_shape"] == ["16*n", "16*m", "16*p"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["modality"], image["num_channels"], image["is_patch_data"]) == ("CT", 1, True)
    assert "not a medical device" in meta["intended_use"]
    readme = (out / "docs" / "README.md").read_text()
    assert "Research use only" in readme and "python -m monai.bundle run" in readme
    assert "[MODEL_CARD.md](../MODEL_CARD.md)" in readme and (out / "docs" / "../MODEL_CARD.md").is_file()
    assert re.search(r"Dice with fed-eval predict \(fp32\), liver: (1\.0000|0\.99\d\d)\.", readme)
    # the network inside carries the metadata, as MONAI's save_net_with_metadata stores it
    extra = {"metadata.json": ""}
    torch.jit.load(str(out / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == meta["version"]


def _predict(model: Path, folder: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # fed-eval predict as users run it, in fp32: bf16 autocast is on only where torch reports native bf16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    result = runner.invoke(app, ["predict", "--model", str(model), "--input", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output


def test_monai_alone_segments_every_nifti_as_fed_eval_predict_does(
    export_run: tuple[Path, str], inputs: Path, small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, _ = export_run
    run_bundle(bundle, inputs, tmp_path / "monai")  # python -m monai.bundle run in a child process
    _predict(small_checkpoint, inputs, tmp_path / "fedseg", monkeypatch)
    written = sorted(p.name for p in (tmp_path / "monai").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "fedseg").iterdir() if p.name.endswith("_seg.nii.gz"))
    assert len(written) == 3
    compared = 0
    for name in written:
        ours, theirs = read_volume(tmp_path / "fedseg" / name), read_volume(tmp_path / "monai" / name)
        assert geometry_difference(ours, theirs) is None, name
        assert theirs.array.dtype == np.uint8
        for label in range(1, 5):
            a, b = ours.array == label, theirs.array == label
            if a.any() or b.any():
                dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
                assert dice >= 0.99, (name, label, dice)
                compared += 1
    assert compared >= 6  # several organs in each image, not a vacuous comparison
