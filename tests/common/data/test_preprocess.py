"""Preprocessing: config checks, orientation, resampling, normalisation, label mapping, restore, cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fedseg.common.data import sitecache
from fedseg.common.data.io import Volume, read_volume
from fedseg.common.data.manifest import LabelManifest, load_manifest
from fedseg.common.data.preprocess import (
    PreparedCase,
    PreprocessConfig,
    normalise,
    preprocess_case,
    restore_to_source,
)
from fedseg.common.data.sitecache import prepare_site
from fedseg.common.errors import DataError
from fedseg.common.synthetic.phantoms import generate_phantoms

IDENTITY = LabelManifest(labels={1: "pancreas", 2: "spleen"})


@pytest.fixture
def real_case(real_ct_path: Path, real_labels_path: Path) -> tuple[Volume, Volume, LabelManifest]:
    return read_volume(real_ct_path), read_volume(real_labels_path), load_manifest(real_ct_path.parent / "labels.toml")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("target_spacing", (2.0, 0.0, 2.0), "target spacing must be positive millimetres"),
        ("orientation", "LPX", "orientation must be a 3-letter code"),
        ("orientation", "LLS", "orientation must be a 3-letter code"),
        ("hu_window", (300.0, -200.0), "hu_window must be (low, high) with low < high"),
    ],
)
def test_preprocess_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PreprocessConfig.model_validate({field: value})


def test_preprocess_config_round_trips_json() -> None:
    cfg = PreprocessConfig(target_spacing=(3.0, 1.5, 1.5), orientation="ras", normalization="body")
    assert cfg.orientation == "RAS"
    assert PreprocessConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_preprocess_resamples_to_target_spacing(synthetic_nifti: tuple[Path, Path]) -> None:
    image, label = (read_volume(p) for p in synthetic_nifti)  # 24³ voxels at (z, y, x) = (2.5, 0.8, 0.8) mm
    case = preprocess_case(image, label, IDENTITY, PreprocessConfig(), case_id="syn")
    # round(24 * 2.5 / 2) = 30 slices, round(24 * 0.8 / 2) = 10 rows and columns
    assert case.image.shape == case.label.shape == (30, 10, 10)  # type: ignore[union-attr]
    assert case.image.dtype == np.float32 and case.label is not None and case.label.dtype == np.uint8
    assert case.source.prepared.spacing == (2.0, 2.0, 2.0)
    assert case.source.grid.shape == (24, 24, 24) and case.source.grid.spacing == pytest.approx((2.5, 0.8, 0.8))
    assert set(np.unique(case.label)) == {0, 1, 2}
    assert case.annotated == (True, True, True, False, False)
    assert case.case_id == "syn"


def test_normalise_clips_then_z_scores() -> None:
    hu = np.array([-1000.0, -200.0, 0.0, 300.0, 2000.0])
    # clipped: -200 -200 0 300 300; mean 40; std sqrt((2*240² + 40² + 2*260²) / 5) = sqrt(50400)
    expected = (np.array([-200.0, -200.0, 0.0, 300.0, 300.0]) - 40.0) / np.sqrt(50400.0)
    np.testing.assert_allclose(normalise(hu, PreprocessConfig()), expected, rtol=1e-6)


def test_normalise_body_uses_voxels_above_threshold() -> None:
    hu = np.array([-1000.0, -1000.0, 0.0, 100.0])
    out = normalise(hu, PreprocessConfig(normalization="body"))
    # body = {0, 100}: mean 50, std 50; air clips to -200 -> (-200 - 50) / 50 = -5
    np.testing.assert_allclose(out, [-5.0, -5.0, -1.0, 1.0], rtol=1e-6)


def test_preprocess_real_ct_normalised_volume_and_body(real_case: tuple[Volume, Volume, LabelManifest]) -> None:
    image, _, manifest = real_case
    case = preprocess_case(image, None, manifest, PreprocessConfig())
    assert case.label is None
    assert abs(float(case.image.mean())) < 1e-3 and abs(float(case.image.std()) - 1.0) < 1e-3
    # on the source grid (3 mm, RAS kept) resampling is the identity, so the body mask is known exactly
    same_grid = {"target_spacing": (3.0, 3.0, 3.0), "orientation": "RAS", "normalization": "body"}
    body = preprocess_case(image, None, manifest, PreprocessConfig.model_validate(same_grid)).image
    inside = image.array > -500
    assert 0.2 < inside.mean() < 0.9
    assert abs(float(body[inside].mean())) < 1e-3 and abs(float(body[inside].std()) - 1.0) < 1e-3
    assert float(body[~inside].max()) < float(body[inside].mean())


def test_preprocess_reorients_ras_to_lps(real_case: tuple[Volume, Volume, LabelManifest]) -> None:
    image, label, manifest = real_case
    assert image.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # the file is RAS
    case = preprocess_case(image, label, manifest, PreprocessConfig(target_spacing=(3.0, 3.0, 3.0)))
    assert case.source.prepared.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    expected = manifest.to_global(label.array)[:, ::-1, ::-1]  # x and y flipped, no interpolation
    np.testing.assert_array_equal(case.label, expected)


def test_preprocess_maps_labels_to_global_classes(real_case: tuple[Volume, Volume, LabelManifest]) -> None:
    image, label, manifest = real_case
    case = preprocess_case(image, label, manifest, PreprocessConfig(target_spacing=(3.0, 3.0, 3.0)))
    assert case.label is not None
    counts = np.bincount(case.label.ravel(), minlength=5)
    # tests/data/README.md: pancreas 644, spleen 9452, kidneys 3947 + 3676, liver 38634 voxels
    assert counts[1:].tolist() == [644, 9452, 3947 + 3676, 38634]


def test_restore_to_source_exact_geometry_real_ct(real_case: tuple[Volume, Volume, LabelManifest]) -> None:
    image, label, manifest = real_case
    case = preprocess_case(image, label, manifest, PreprocessConfig())  # 3 mm RAS -> 2 mm LPS
    assert case.label is not None and case.source.prepared.shape == (45, 152, 183)
    restored = restore_to_source(case.label, case, is_label=True)
    assert restored.shape == image.shape and restored.spacing == image.spacing
    assert restored.origin == image.origin and restored.direction == image.direction
    assert restored.array.dtype == np.uint8
    reference = manifest.to_global(label.array)
    for cls in range(1, 5):
        a, b = restored.array == cls, reference == cls
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97, cls
    probability = restore_to_source((case.label == 4).astype(np.float32), case, is_label=False)
    assert probability.array.dtype == np.float32 and probability.shape == image.shape
    assert probability.origin == image.origin and probability.direction == image.direction


def test_restore_to_source_identity_grid_is_lossless(real_case: tuple[Volume, Volume, LabelManifest]) -> None:
    image, label, manifest = real_case
    case = preprocess_case(image, label, manifest, PreprocessConfig(target_spacing=(3.0, 3.0, 3.0)))
    assert case.label is not None
    restored = restore_to_source(case.label, case, is_label=True)
    np.testing.assert_array_equal(restored.array, manifest.to_global(label.array))


def test_restore_to_source_rejects_wrong_shape(real_case: tuple[Volume, Volume, LabelManifest]) -> None:
    image, _, manifest = real_case
    case = preprocess_case(image, None, manifest, PreprocessConfig())
    with pytest.raises(ValueError, match=r"restore_to_source needs the prepared shape \(45, 152, 183\)"):
        restore_to_source(np.zeros((45, 152, 182), np.uint8), case, is_label=True)


def test_preprocess_rejects_label_on_other_grid(synthetic_nifti: tuple[Path, Path]) -> None:
    image, label = (read_volume(p) for p in synthetic_nifti)
    shifted = Volume(label.array, label.spacing, (0.0, 0.0, 0.0), label.direction)
    with pytest.raises(DataError, match=r"case c1: label geometry .* differs from the image's"):
        preprocess_case(image, shifted, IDENTITY, PreprocessConfig(), case_id="c1")
    cropped = Volume(label.array[1:], label.spacing, label.origin, label.direction)
    with pytest.raises(DataError, match=r"case c1: label shape \(23, 24, 24\) differs from image shape"):
        preprocess_case(image, cropped, IDENTITY, PreprocessConfig(), case_id="c1")


def test_preprocess_unknown_label_value_names_case(synthetic_nifti: tuple[Path, Path]) -> None:
    image, label = (read_volume(p) for p in synthetic_nifti)
    spleen_only = LabelManifest(labels={1: "spleen"})
    with pytest.raises(DataError, match="case c2: label values 2 are not in the label manifest"):
        preprocess_case(image, label, spleen_only, PreprocessConfig(), case_id="c2")


@pytest.fixture(scope="module")
def phantom_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "ph"
    generate_phantoms(out, sites=1, cases_per_site=2, val_cases=0, size=(32, 32, 32), seed=1)
    return out / "site-1"


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original = sitecache.preprocess_case

    def counting(*args: object, **kwargs: object) -> PreparedCase:
        calls.append(str(kwargs.get("case_id")))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sitecache, "preprocess_case", counting)
    return calls


def test_prepare_site_second_run_uses_cache(
    phantom_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, cfg = load_manifest(phantom_site / "labels.toml"), PreprocessConfig()
    calls = _count_calls(monkeypatch)
    first = prepare_site(phantom_site, manifest, cfg, tmp_path / "cache")
    assert calls == ["site1_000", "site1_001"] and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    second = prepare_site(phantom_site, manifest, cfg, tmp_path / "cache")
    assert len(calls) == 2  # nothing preprocessed again
    for a, b in zip(first, second, strict=True):
        assert a.case_id == b.case_id and a.annotated == b.annotated and a.source == b.source
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)  # type: ignore[arg-type]
    image = phantom_site / "imagesTr" / "site1_001.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    prepare_site(phantom_site, manifest, cfg, tmp_path / "cache")
    assert calls[2:] == ["site1_001"]  # only the touched case
    prepare_site(phantom_site, manifest, PreprocessConfig(hu_window=(-100.0, 200.0)), tmp_path / "cache")
    assert calls[3:] == ["site1_000", "site1_001"]  # new settings, new fingerprints


def test_prepare_site_recomputes_unreadable_cache_entry(
    phantom_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    manifest, cfg = load_manifest(phantom_site / "labels.toml"), PreprocessConfig()
    prepare_site(phantom_site, manifest, cfg, tmp_path)
    broken = sorted(tmp_path.glob("site1_000.*.npz"))[0]
    broken.write_bytes(b"not a zip file")
    calls = _count_calls(monkeypatch)
    with caplog.at_level(logging.WARNING):
        cases = prepare_site(phantom_site, manifest, cfg, tmp_path)
    assert calls == ["site1_000"] and "is unreadable" in caplog.text
    assert cases[0].image.shape == cases[1].image.shape


def test_prepare_site_without_cache_and_phantom_grid(phantom_site: Path) -> None:
    cases = prepare_site(phantom_site, load_manifest(phantom_site / "labels.toml"), PreprocessConfig(), None)
    assert [case.case_id for case in cases] == ["site1_000", "site1_001"]
    for case in cases:  # a 32³ phantom becomes 32 slices of about 32 × 0.85..1.05 voxels at 2 mm
        assert case.image.shape[0] == 32 and 27 <= case.image.shape[1] == case.image.shape[2] <= 34
        assert case.label is not None and set(np.unique(case.label)) == {0, 1, 2, 3, 4}
