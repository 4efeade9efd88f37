"""Shared fixtures: tiny seeded synthetic CT volumes and the real CT shipped in tests/data."""

from __future__ import annotations

import locale
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _restore_process_locale() -> Iterator[None]:
    """Undo GDCM's locale change after every test.

    Writing a DICOM file with SimpleITK (the DICOM tests build their series that way; fedseg itself never writes
    DICOM) leaves the C library's whole locale at "C". The preferred encoding then becomes ASCII, and every later
    ``open``/``read_text``/``subprocess(text=True)`` in this process fails on the first "α" or "→". This was the
    in-process interaction that made the federation end-to-end tests fail in a single pytest run.
    """
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture
def real_ct_path() -> Path:
    """The real abdominal CT (122x101x30 at 3 mm, int16 HU); see tests/data/README.md for attribution."""
    return DATA_DIR / "ct.nii.gz"


@pytest.fixture
def real_labels_path() -> Path:
    """TotalSegmentator labels of the real CT: spleen 1, kidney_right 2, kidney_left 3, liver 5, pancreas 7."""
    return DATA_DIR / "totalseg_labels.nii.gz"


def make_synthetic_case(size: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (z, y, x) HU volume with two organs: a bright sphere (label 1) and a darker box (label 2)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(-50.0, 20.0, (size, size, size)).astype(np.float32)
    label = np.zeros((size, size, size), dtype=np.uint8)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    c = size / 2
    sphere = (zz - c) ** 2 + (yy - c) ** 2 + (xx - size / 3) ** 2 <= (size / 5) ** 2
    label[sphere] = 1
    label[size // 4 : size // 2, size // 8 : size // 3, 2 * size // 3 : 5 * size // 6] = 2
    image[label == 1] += 150.0
    image[label == 2] += 60.0
    return image, label


@pytest.fixture
def synthetic_case() -> tuple[np.ndarray, np.ndarray]:
    return make_synthetic_case()


@pytest.fixture
def synthetic_nifti(tmp_path: Path) -> tuple[Path, Path]:
    """The synthetic case written as NIfTI with anisotropic spacing and a non-trivial origin."""
    image, label = make_synthetic_case()
    paths = []
    for name, arr in (("image", image), ("label", label)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.8, 0.8, 2.5))
        img.SetOrigin((-10.0, 20.0, 5.0))
        path = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(path))
        paths.append(path)
    return paths[0], paths[1]
