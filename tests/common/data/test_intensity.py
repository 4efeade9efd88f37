"""Per-site intensity statistics (``normalization = "site"``): pooling by hand, the site cache, the fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedseg.common.cli.train import load_cases
from fedseg.common.data.intensity import IntensityStats
from fedseg.common.data.io import Volume, write_volume
from fedseg.common.data.manifest import LabelManifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig, normalise, preprocess_case, region_statistics
from fedseg.common.data.sitecache import prepare_site, site_normalised
from fedseg.common.engine.checkpoint import CheckpointMeta, config_hash
from fedseg.common.engine.inference import predict_volume
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.server.config import ServerConfig
from fedseg.server.run.central import CentralValidator
from tests.common.data.test_preprocess import _count_calls

SITE = PreprocessConfig(normalization="site")
MANIFEST = LabelManifest(labels={1: "pancreas"})
# 4³ voxels at the 2 mm target spacing in LPS, so preprocessing keeps every voxel value. Half of each volume is
# air (-1000 HU, outside the body, clipped to -200); the body holds values in equal parts:
#   case a: 0 and 100 HU                    -> body n 32, mean 50, sd 50
#   case b: 200 and 400 (-> 300)            -> body n 32, mean 250, sd 50
#   case c (no label): 0, 100, 200 and 300  -> body n 32, mean 150, variance (2·150² + 2·50²) / 4 = 12500
# a + b pooled {0, 100, 200, 300} x 16: mean 150, variance (150² + 50² + 50² + 150²) / 4 = 12500; with c the same
POOLED_MEAN, POOLED_SD = 150.0, float(np.sqrt(12500.0))


def _hu(low: float, high: float) -> np.ndarray:
    hu = np.full((4, 4, 4), -1000.0, np.float32)
    hu[2], hu[3] = low, high
    return hu


HU = {"a": _hu(0.0, 100.0), "b": _hu(200.0, 400.0), "c": _hu(0.0, 200.0)}
HU["c"][2, 2:], HU["c"][3, 2:] = 100.0, 300.0


def _volume(array: np.ndarray) -> Volume:
    return Volume(array, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    for case_id, hu in HU.items():
        write_volume(_volume(hu), root / "images" / f"{case_id}.nii.gz")
        if case_id != "c":
            label = np.zeros(hu.shape, np.uint8)
            label[3] = 1
            write_volume(_volume(label), root / "labels" / f"{case_id}.nii.gz")
    return root


def _expected(case_id: str) -> np.ndarray:
    return (np.clip(HU[case_id], -200.0, 300.0) - POOLED_MEAN) / POOLED_SD


def test_pooled_statistics_by_hand() -> None:
    a, b = (region_statistics(HU[k], SITE) for k in ("a", "b"))
    assert (a.mean, a.std, a.voxels) == (50.0, 50.0, 32)
    assert (b.mean, b.std, b.voxels) == (250.0, 50.0, 32)
    pooled = IntensityStats.pooled([a, b])
    assert pooled.voxels == 64
    assert pooled.mean == pytest.approx(POOLED_MEAN) and pooled.std == pytest.approx(POOLED_SD)
    np.testing.assert_allclose(normalise(HU["b"], SITE, pooled), _expected("b"), rtol=1e-6)
    with pytest.raises(ValueError, match="no voxels"):
        IntensityStats.pooled([])


def test_site_cache_applies_the_pooled_statistics_to_every_case(
    site: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fedseg.common.data.sitecache"):
        cases = prepare_site(site, MANIFEST, SITE, tmp_path / "cache")
    assert [c.case_id for c in cases] == ["a", "b", "c"]
    for case in cases:
        np.testing.assert_allclose(case.image, _expected(case.case_id), rtol=1e-5, atol=1e-6)
        assert case.intensity is not None
        assert case.intensity.mean == pytest.approx(POOLED_MEAN) and case.intensity.voxels == 96
    assert "mean 150.0 HU, sd 111.8 HU over 96 body voxels of 3 cases" in caplog.text
    # each entry keeps its own statistics: a second run pools them again to the same images
    again = prepare_site(site, MANIFEST, SITE, tmp_path / "cache")
    for first, second in zip(cases, again, strict=True):
        np.testing.assert_array_equal(first.image, second.image)


def test_cache_built_under_another_normalization_is_not_reused(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_calls(monkeypatch)
    volume = prepare_site(site, MANIFEST, PreprocessConfig(), tmp_path / "cache")
    assert calls == ["a", "b", "c"]
    by_site = prepare_site(site, MANIFEST, SITE, tmp_path / "cache")
    assert calls == ["a", "b", "c"] * 2 and len(list((tmp_path / "cache").glob("*.npz"))) == 6
    assert not np.allclose(volume[0].image, by_site[0].image)
    np.testing.assert_allclose(by_site[0].image, _expected("a"), rtol=1e-5, atol=1e-6)


def test_each_folder_is_one_site_for_fed_eval_train_and_central_validation(site: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"  # a second site holding only a copy of case a: its own statistics (50, 50)
    for kind in ("images", "labels"):
        (other / kind).mkdir(parents=True)
        (other / kind / "a.nii.gz").write_bytes((site / kind / "a.nii.gz").read_bytes())
    cases = load_cases([site, other], SITE, tmp_path / "cache", "--data")
    assert [c.case_id for c in cases] == ["a", "b", "a"]  # c has no label: pooled, not trained on
    stats = [c.intensity for c in cases]
    assert stats[0] == stats[1] and stats[0] is not None and stats[0].voxels == 96
    assert stats[2] == IntensityStats(50.0, 50.0, 32)
    np.testing.assert_allclose(cases[2].image, (np.clip(HU["a"], -200.0, 300.0) - 50.0) / 50.0, rtol=1e-6)
    central = CentralValidator(ServerConfig(validation={"data": site}, preprocess=SITE), tmp_path / "central")
    for case in central.cases:
        np.testing.assert_allclose(case.image, _expected(case.case_id), rtol=1e-5, atol=1e-6)


def test_site_normalised_leaves_other_modes_alone_and_needs_statistics() -> None:
    case = preprocess_case(_volume(HU["a"]), None, MANIFEST, PreprocessConfig())
    assert site_normalised([case], PreprocessConfig())[0] is case
    bare = PreparedCase("old", case.image, None, case.annotated, case.source)
    with pytest.raises(ValueError, match=r"cases \['old'\] carry no intensity statistics"):
        site_normalised([bare], SITE)


def test_single_volume_falls_back_to_its_own_body_statistics(caplog: pytest.LogCaptureFixture) -> None:
    volume = _volume(HU["b"])
    alone = preprocess_case(volume, None, MANIFEST, SITE)
    body = preprocess_case(volume, None, MANIFEST, PreprocessConfig(normalization="body"))
    np.testing.assert_array_equal(alone.image, body.image)
    np.testing.assert_allclose(alone.image, (np.clip(HU["b"], -200.0, 300.0) - 250.0) / 50.0, rtol=1e-6)
    model_cfg = ModelConfig(feature_scale=16)
    meta = CheckpointMeta(
        model=model_cfg, class_names=("background", "pancreas", "spleen", "kidney", "liver"), preprocess=SITE,
        patch_size=(16, 16, 16), config_hash=config_hash(model=model_cfg, preprocess=SITE), seed=0,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fedseg.common.engine.inference"):
        result = predict_volume(build_model(model_cfg).eval(), meta, volume, "cpu")
    assert result.labels.shape == (4, 4, 4)
    lines = [r.getMessage() for r in caplog.records if "normalization 'site'" in r.getMessage()]
    assert lines == ["normalization 'site': one volume alone is z-scored with its own body statistics"]
