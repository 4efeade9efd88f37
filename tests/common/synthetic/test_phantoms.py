"""Phantom generator: layout, manifests, determinism, anatomy, site heterogeneity, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.data.layouts import discover_cases
from fedseg.common.data.manifest import load_manifest
from fedseg.common.synthetic.phantoms import (
    NEUTRAL_ACQUISITION,
    PhantomConfig,
    generate_phantoms,
    plan_sites,
    render_case,
    site_acquisition,
)

SIZE = (32, 32, 32)
runner = CliRunner()


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms") / "out"
    generate_phantoms(out, sites=3, cases_per_site=2, val_cases=1, size=SIZE, seed=0, partial_site=True)
    return out


def _labels(root: Path) -> set[int]:
    values: set[int] = set()
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        values |= {int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))}
    return values


def test_generate_phantoms_writes_msd_sites_and_validation(phantom_root: Path) -> None:
    assert sorted(p.name for p in phantom_root.iterdir()) == ["site-1", "site-2", "site-3", "validation"]
    for name, count in (("site-1", 2), ("site-2", 2), ("site-3", 2), ("validation", 1)):
        meta = json.loads((phantom_root / name / "dataset.json").read_text())
        assert meta["numTraining"] == count and meta["modality"] == {"0": "CT"}
        assert meta["phantom"]["config"]["seed"] == 0
        cases = discover_cases(phantom_root / name)
        assert len(cases) == count and all(case.label is not None and case.label.is_file() for case in cases)


def test_generate_phantoms_manifests_describe_each_site(phantom_root: Path) -> None:
    full = {1: "pancreas", 2: "spleen", 3: "kidney", 4: "liver"}
    assert load_manifest(phantom_root / "site-1" / "labels.toml").labels == full
    assert load_manifest(phantom_root / "validation" / "labels.toml").labels == full
    split = load_manifest(phantom_root / "site-2" / "labels.toml")
    assert split.labels == full | {5: "kidney"}  # left kidney written as 5, mapped to kidney
    partial = load_manifest(phantom_root / "site-3" / "labels.toml")
    assert partial.annotated == ["pancreas", "liver"]
    assert partial.annotated_mask() == (True, True, False, False, True)


def test_generate_phantoms_label_values_follow_each_site(phantom_root: Path) -> None:
    assert _labels(phantom_root / "site-1") == {0, 1, 2, 3, 4}
    assert _labels(phantom_root / "site-2") == {0, 1, 2, 3, 4, 5}
    assert _labels(phantom_root / "site-3") == {0, 1, 4}  # spleen and kidneys left unlabelled
    assert _labels(phantom_root / "validation") == {0, 1, 2, 3, 4}


def test_generate_phantoms_same_seed_same_bytes(phantom_root: Path, tmp_path: Path) -> None:
    generate_phantoms(tmp_path / "a", sites=3, cases_per_site=2, val_cases=1, size=SIZE, seed=0, partial_site=True)
    files = sorted(p.relative_to(phantom_root) for p in phantom_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for rel in files:
        assert (phantom_root / rel).read_bytes() == (tmp_path / "a" / rel).read_bytes(), rel


def test_render_case_other_seed_draws_another_abdomen() -> None:
    image_a, organs_a = render_case(SIZE, NEUTRAL_ACQUISITION, (0, 2, 0, 0))
    image_again, organs_again = render_case(SIZE, NEUTRAL_ACQUISITION, (0, 2, 0, 0))
    _, organs_b = render_case(SIZE, NEUTRAL_ACQUISITION, (1, 2, 0, 0))
    np.testing.assert_array_equal(image_a.array, image_again.array)
    np.testing.assert_array_equal(organs_a.array, organs_again.array)
    a, b = organs_a.array, organs_b.array
    for organ in range(1, 5):  # every organ present in both draws ...
        assert (a == organ).sum() > 0 and (b == organ).sum() > 0, organ
    # ... but in other places and sizes: the organ maps disagree on a real share of the foreground
    foreground = (a > 0) | (b > 0)
    assert (a != b)[foreground].mean() > 0.05
    volumes_a = np.bincount(a.ravel(), minlength=6)[1:5]
    volumes_b = np.bincount(b.ravel(), minlength=6)[1:5]
    assert not np.array_equal(volumes_a, volumes_b)


def test_render_case_has_every_organ_and_a_thin_pancreas() -> None:
    _, organs = render_case((32, 48, 48), NEUTRAL_ACQUISITION, (0, 2, 0, 0))
    counts = np.bincount(organs.array.ravel(), minlength=6)
    assert all(counts[1:] > 0), counts
    assert counts[1] < 0.005 * organs.array.size  # pancreas: under 0.5 % of the volume
    assert counts[1] < min(counts[2], counts[3], counts[4], counts[5])
    depth = ndimage.distance_transform_edt(organs.array == 1).max()
    assert depth <= 3.0  # at most ~3 voxels from its surface: a thin tube ...
    assert ndimage.distance_transform_edt(organs.array == 4).max() > 2 * depth  # ... unlike the liver


def test_render_case_tissue_intensities() -> None:
    image, organs = render_case((32, 48, 48), NEUTRAL_ACQUISITION, (0, 2, 0, 1))
    hu, organ = image.array.astype(float), organs.array
    assert image.array.dtype == np.int16
    assert np.median(hu[:, :2, :2]) < -950  # air in the corners
    for organ_id, expected in ((1, 40), (2, 50), (4, 60)):
        core = ndimage.binary_erosion(organ == organ_id) if organ_id != 1 else organ == organ_id
        assert abs(np.median(hu[core]) - expected) < 25, (organ_id, np.median(hu[core]))
    assert hu.max() > 400  # bone


def test_sites_differ_in_acquisition() -> None:
    sites = plan_sites(PhantomConfig(sites=3, size=SIZE))
    spacings = [site.acquisition.spacing_z for site in sites[:3]]
    assert len(set(spacings)) == 3 and min(spacings) >= 1.5 and max(spacings) <= 5.0
    assert sites[-1].name == "validation" and sites[-1].acquisition == NEUTRAL_ACQUISITION
    ras = site_acquisition(3, seed=0)
    image, _ = render_case(SIZE, ras, (0, 2, 3, 0))
    assert ras.orientation == "RAS" and image.direction == (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    assert image.spacing[0] == ras.spacing_z and image.shape[0] == round(SIZE[0] * 2 / ras.spacing_z)


def test_generate_phantoms_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="output folder is not empty"):
        generate_phantoms(tmp_path, sites=1, cases_per_site=1, val_cases=0, size=SIZE)


def test_cli_phantoms_writes_and_prints_table(tmp_path: Path) -> None:
    args = ["phantoms", "--out", str(tmp_path / "o"), "--sites", "2", "--cases-per-site", "1", "--val-cases", "0"]
    result = runner.invoke(app, [*args, "--size", "32,32,32", "--seed", "3"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "site-2" in result.stdout and "kidney=3+5" in result.stdout
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["site-1", "site-2"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--size", "32,32"], 2, "--size must be three positive integers like 96,96,64, got '32,32'"),
        (["--sites", "0"], 1, "error: sites: Input should be greater than or equal to 1"),
        (["--size", "8,32,32"], 1, "size must be 16..512 voxels per side, got (8, 32, 32)"),
    ],
)
def test_cli_phantoms_rejects_bad_values(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = runner.invoke(app, ["phantoms", "--out", str(tmp_path / "o"), *args], env={"COLUMNS": "200"})
    assert result.exit_code == code
    assert message in " ".join(result.output.split())


def test_cli_phantoms_rejects_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    result = runner.invoke(app, ["phantoms", "--out", str(tmp_path), "--size", "32,32,32"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert f"error: {tmp_path}: output folder is not empty; choose a new --out or delete it" in " ".join(
        result.output.split()
    )
