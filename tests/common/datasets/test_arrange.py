"""Archives arranged into layouts fedseg reads: KiTS pairs, and archives in no known layout refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedseg.client.cli.main import app as client_app
from fedseg.common.cli.main import app
from fedseg.common.data.io import Volume, write_volume
from fedseg.common.data.layouts import discover_cases
from fedseg.common.data.manifest import load_manifest
from fedseg.common.datasets.arrange import arrange
from fedseg.common.datasets.registry import load_registry
from fedseg.common.errors import DataError
from tests.common.datasets.conftest import IDENTITY, SIZE, SPACING, ArchiveServer, ct_array, registry_file, zip_folder

runner = CliRunner()


def _kits_case(root: Path, index: int) -> None:
    case = root / "dataset" / f"case_{index:05d}"
    label = np.zeros((SIZE, SIZE, SIZE), np.uint8)
    label[4:8, 4:8, 4:8] = 1  # kidney
    label[5:6, 5:6, 5:6] = 2  # tumour
    label[9:11, 4:8, 4:8] = 3  # cyst
    for name, array in (("imaging.nii.gz", ct_array(index)), ("segmentation.nii.gz", label)):
        write_volume(Volume(array, SPACING, (0.0, 0.0, 0.0), IDENTITY), case / name)


def test_a_kits_mirror_is_fetched_as_image_label_pairs(tmp_path: Path, archive_server: ArchiveServer) -> None:
    for index in range(3):
        _kits_case(tmp_path / "kits23", index)
    (tmp_path / "kits23" / "dataset" / "kits23.json").write_text("[]")
    body = zip_folder(tmp_path / "kits23", tmp_path / "kits23.zip")
    archive_server.files["/kits23.zip"] = body
    sha = hashlib.sha256(body).hexdigest()
    mirror = registry_file(tmp_path / "mirror.toml", "kits23", url=archive_server.url("/kits23.zip"), sha256=sha)
    args = ["datasets", "fetch", "kits23", "--out", str(tmp_path / "data"), "--registry", str(mirror)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    dataset = tmp_path / "data" / "kits23"
    assert [c.case_id for c in discover_cases(dataset)] == ["case_00000", "case_00001", "case_00002"]
    assert (dataset / "kits23.json").is_file()
    manifest = load_manifest(dataset / "labels.toml")
    assert manifest.labels == {1: "kidney", 2: "kidney", 3: "kidney"} and manifest.annotated == ["kidney"]
    checked = runner.invoke(client_app, ["check", str(dataset)])
    assert checked.exit_code == 0 and "3 of 3 cases usable" in checked.output


@pytest.mark.parametrize(
    ("name", "folders", "message"),
    [
        ("msd-spleen", ["Task09_Spleen/imagesTr"], "expected one folder with dataset.json, found none"),
        ("msd-spleen", ["a/dataset.json", "b/dataset.json"], "found a, b"),
        ("kits23", ["dataset/case_00000"], "holds no KiTS case"),
        ("totalsegmentator", ["s0000"], "holds no TotalSegmentator case"),
    ],
)
def test_an_archive_in_another_layout_is_one_line(tmp_path: Path, name: str, folders: list[str], message: str) -> None:
    unpacked = tmp_path / "unpacked"
    for folder in folders:
        path = unpacked / folder
        if path.suffix == ".json":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
        else:
            path.mkdir(parents=True)
    with pytest.raises(DataError, match=message):
        arrange(load_registry()[name], unpacked, tmp_path / "dataset")
