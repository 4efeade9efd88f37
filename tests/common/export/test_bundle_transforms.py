"""The bundle's own MONAI components reproduce fedseg's preprocessing, window and restoration exactly."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser
from monai.data.meta_tensor import MetaTensor

from fedseg.common.data.io import read_volume
from fedseg.common.data.manifest import default_manifest
from fedseg.common.data.preprocess import PreprocessConfig, preprocess_case, restore_to_source
from fedseg.common.engine.checkpoint import CheckpointMeta, load_checkpoint
from fedseg.common.engine.inference import window_size
from fedseg.common.export import bundle_transforms
from fedseg.common.export.bundle import CONFIG_FILE, write_bundle
from fedseg.common.export.bundle_transforms import discrete_gaussian, fitted_window, smooth
from fedseg.common.export.torchscript import trace


@pytest.fixture(scope="module")
def bundle_root(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, meta = load_checkpoint(small_checkpoint)
    return write_bundle(tmp_path_factory.mktemp("bundle") / "b", trace(model), meta, "best.pt", {})


@pytest.fixture
def on_path(bundle_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The bundle's ``scripts`` package importable, as ``monai.bundle run`` makes it; forgotten afterwards."""
    monkeypatch.syspath_prepend(str(bundle_root))
    yield bundle_root
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        del sys.modules[name]


def _parser(root: Path, meta: CheckpointMeta) -> ConfigParser:
    """The bundle's inference.json with ``meta``'s preprocessing in place of the exported checkpoint's."""
    from fedseg.common.export.bundleconfig import inference_config

    parser = ConfigParser(inference_config(meta))
    parser["bundle_root"] = str(root)
    return parser


def _meta(small_checkpoint: Path, **preprocess: object) -> CheckpointMeta:
    _, meta = load_checkpoint(small_checkpoint)
    return meta.model_copy(update={"preprocess": PreprocessConfig.model_validate(preprocess)})


@pytest.mark.parametrize(("variance_mm2", "spacing"), [(0.25, 3.0), (0.36, 0.8), (4.0, 1.0), (0.01, 1.0), (30.0, 0.7)])
def test_the_kernel_is_itks_discrete_gaussian(variance_mm2: float, spacing: float) -> None:
    impulse = np.zeros((1, 1, 161), np.float32)
    impulse[0, 0, 80] = 1
    image = sitk.GetImageFromArray(impulse)
    image.SetSpacing((spacing, 1.0, 1.0))
    itk = sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, [variance_mm2, 0, 0], 32, 0.01, True))[0, 0]
    kernel = discrete_gaussian(variance_mm2 / spacing**2)
    radius = (kernel.size - 1) // 2
    # ITK's Bessel functions are polynomial approximations: a few 1e-6 apart from the series at large variances
    np.testing.assert_allclose(itk[80 - radius : 81 + radius], kernel, rtol=0, atol=1e-5)
    assert np.abs(itk).sum() - np.abs(itk[80 - radius : 81 + radius]).sum() < 1e-7  # same support


def test_smoothing_matches_itk_to_the_borders() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 100, (9, 20, 14)).astype(np.float32)  # (z, y, x)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.7, 2.5))
    variances = [0.36, 0.5, 0.0]  # mm² along x, y, z
    itk = sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, variances, 32, 0.01, True))
    ours = smooth(torch.from_numpy(volume.transpose(2, 1, 0).copy())[None], [0.36 / 0.64, 0.5 / 0.49, 0.0])
    np.testing.assert_allclose(ours[0].numpy().transpose(2, 1, 0), itk, rtol=0, atol=1e-3)


CASES = [
    {"target_spacing": (6.0, 6.0, 6.0)},
    {"target_spacing": (2.0, 2.0, 2.0), "orientation": "RAS"},
    {"target_spacing": (5.0, 3.5, 4.5), "normalization": "body"},
    {"target_spacing": (4.0, 4.0, 4.0), "hu_window": (-100.0, 200.0), "normalization": "site", "antialias": False},
]


@pytest.mark.parametrize("preprocess", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_the_bundles_preprocessing_is_fedsegs(
    on_path: Path, small_checkpoint: Path, ct_file: Path, preprocess: dict[str, object]
) -> None:
    meta = _meta(small_checkpoint, **preprocess)
    case = preprocess_case(read_volume(ct_file), None, default_manifest(), meta.preprocess)
    prepared = _parser(on_path, meta).get_parsed_content("preprocessing")({"image": str(ct_file)})["image"]
    assert tuple(prepared.shape) == (1, *case.image.shape)
    np.testing.assert_allclose(prepared[0].numpy(), case.image, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spacing", [(6.0, 6.0, 6.0), (4.0, 4.0, 4.0), (2.5, 1.5, 1.5)])
def test_labels_go_back_to_the_input_grid_voxel_for_voxel_as_fedseg_does(
    on_path: Path, small_checkpoint: Path, ct_file: Path, spacing: tuple[float, float, float]
) -> None:
    # random labels: every nearest-neighbour decision shows, ties (4 mm from 3 mm: every 4th row) included
    meta = _meta(small_checkpoint, target_spacing=spacing)
    case = preprocess_case(read_volume(ct_file), None, default_manifest(), meta.preprocess)
    labels = np.random.default_rng(1).integers(0, 5, case.image.shape).astype(np.uint8)
    parser = _parser(on_path, meta)
    image = parser.get_parsed_content("preprocessing")({"image": str(ct_file)})["image"]
    pred = MetaTensor(torch.from_numpy(labels[None].astype(np.float32)), meta=image.meta)
    invert = parser.get_parsed_content("postprocessing").transforms[1]
    restored = invert({"image": image, "pred": pred})["pred"][0].numpy()
    expected = restore_to_source(labels, case, is_label=True).array
    assert restored.shape == expected.shape[::-1]
    assert np.array_equal(restored.transpose(2, 1, 0), expected)


@pytest.mark.parametrize("shape", [(15, 50, 61), (40, 160, 170), (16, 16, 1)])
def test_the_window_is_fedsegs(shape: tuple[int, int, int]) -> None:
    patch = (32, 96, 96)
    assert tuple(fitted_window(shape, patch)) == window_size(shape, patch)


def test_the_script_imports_only_monai_torch_numpy_and_the_standard_library() -> None:
    tree = ast.parse(Path(bundle_transforms.__file__).read_text(encoding="utf-8"))
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots - set(sys.stdlib_module_names) == {"monai", "numpy", "torch"}


def test_the_configs_name_the_script_the_bundle_holds(bundle_root: Path) -> None:
    text = (bundle_root / CONFIG_FILE).read_text()
    assert "scripts.fedseg_transforms.CentredSpacingd" in text and "FittedWindowInferer" in text
    source = Path(bundle_transforms.__file__).read_text()
    assert (bundle_root / "scripts" / "fedseg_transforms.py").read_text() == source
