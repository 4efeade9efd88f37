"""read_volume / write_volume: axis convention, exact geometry round trips (real CT, DICOM), one-line read errors."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fedseg.common.data.io import Volume, read_volume, write_volume
from fedseg.common.errors import DataError

# A permuted, flipped direction (x -> -y, y -> x, z -> z): exactly representable in NIfTI's sform.
PERMUTED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _volume(shape: tuple[int, int, int] = (4, 5, 6), dtype: type = np.int16) -> Volume:
    array = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
    return Volume(array, spacing=(2.5, 0.75, 0.5), origin=(-10.5, 20.25, 5.0), direction=PERMUTED)


def _write_sitk(array: np.ndarray, path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


# --- axis convention ---------------------------------------------------------------------------------------


def test_array_is_zyx_and_spacing_follows_array_axes(tmp_path: Path) -> None:
    image = sitk.Image(6, 5, 4, sitk.sitkInt16)  # size is (x, y, z)
    image.SetPixel(3, 2, 1, 7)  # index (x=3, y=2, z=1)
    image.SetSpacing((0.5, 0.75, 2.5))
    image.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    volume = read_volume(tmp_path / "a.nii.gz")
    assert volume.shape == (4, 5, 6)
    assert volume.array[1, 2, 3] == 7 and int(volume.array.sum()) == 7
    assert volume.spacing == (2.5, 0.75, 0.5)
    assert volume.origin == (1.0, 2.0, 3.0)  # physical (x, y, z), not reversed


def test_to_sitk_and_from_sitk_are_inverse() -> None:
    volume = _volume()
    image = volume.to_sitk()
    assert image.GetSize() == (6, 5, 4)
    assert image.GetSpacing() == (0.5, 0.75, 2.5)
    back = Volume.from_sitk(image)
    np.testing.assert_array_equal(back.array, volume.array)
    assert (back.spacing, back.origin, back.direction) == (volume.spacing, volume.origin, volume.direction)


def test_with_array_keeps_geometry_and_checks_shape() -> None:
    volume = _volume()
    mask = volume.with_array(volume.array > 10)
    assert (mask.spacing, mask.origin, mask.direction) == (volume.spacing, volume.origin, volume.direction)
    assert mask.to_sitk().GetPixelID() == sitk.sitkUInt8  # bool is stored as uint8
    with pytest.raises(ValueError, match=r"\(4, 5, 6\)"):
        volume.with_array(np.zeros((4, 5, 7)))


def test_volume_rejects_non_3d_array() -> None:
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((4, 5)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), PERMUTED)


# --- round trips ------------------------------------------------------------------------------------------


def test_real_ct_round_trip_is_exact(real_ct_path: Path, tmp_path: Path) -> None:
    source = read_volume(real_ct_path)
    assert source.shape == (30, 101, 122)
    assert source.spacing == (3.0, 3.0, 3.0)
    assert source.array.dtype == np.int16
    assert (int(source.array.min()), int(source.array.max())) == (-1100, 1207)
    # README gives the RAS origin (-178.0, 11.3, 94.3); SimpleITK is LPS, so x and y change sign.
    np.testing.assert_allclose(source.origin, (178.0, -11.3, 94.3), atol=0.05)
    write_volume(source, tmp_path / "nested" / "ct.nii.gz")
    back = read_volume(tmp_path / "nested" / "ct.nii.gz")
    np.testing.assert_array_equal(back.array, source.array)
    assert back.array.dtype == source.array.dtype
    assert back.spacing == source.spacing
    assert back.origin == source.origin
    assert back.direction == source.direction


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_round_trip_keeps_values_dtype_and_geometry(tmp_path: Path, name: str, dtype: type) -> None:
    volume = _volume(dtype=dtype)
    write_volume(volume, tmp_path / name)
    back = read_volume(tmp_path / name)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == volume.array.dtype
    assert (back.spacing, back.origin, back.direction) == (volume.spacing, volume.origin, volume.direction)


def test_oblique_direction_survives_within_float32(tmp_path: Path) -> None:
    angle = np.deg2rad(20.0)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    volume = Volume(np.zeros((3, 4, 5), np.int16), (2.0, 1.0, 1.0), (1.0, 2.0, 3.0), (c, -s, 0, s, c, 0, 0, 0, 1))
    write_volume(volume, tmp_path / "oblique.nii.gz")
    back = read_volume(tmp_path / "oblique.nii.gz")
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-6)


def test_write_volume_refuses_non_nifti_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NIfTI"):
        write_volume(_volume(), tmp_path / "v.mha")


# --- DICOM series -----------------------------------------------------------------------------------------


def _write_dicom_series(image: sitk.Image, folder: Path, series_uid: str, prefix: str = "slice") -> None:
    """Write ``image`` as one DICOM file per z slice with the tags a scanner would set."""
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0037": orientation,
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0013": str(z + 1),
            "0018|0050": str(image.GetSpacing()[2]),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{z:03d}.dcm"))
        writer.Execute(slice_)


def _ct_like(shape_xyz: tuple[int, int, int]) -> sitk.Image:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=shape_xyz[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.75, 0.75, 2.5))
    image.SetOrigin((-12.5, 30.0, 100.0))
    return image


def test_dicom_series_reads_with_geometry(tmp_path: Path) -> None:
    image = _ct_like((16, 12, 8))
    _write_dicom_series(image, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.10")
    volume = read_volume(tmp_path / "dicom")
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(volume.spacing, (2.5, 0.75, 0.75), atol=1e-4)
    np.testing.assert_allclose(volume.origin, (-12.5, 30.0, 100.0), atol=1e-4)
    np.testing.assert_allclose(volume.direction, np.eye(3).ravel(), atol=1e-6)
    write_volume(volume, tmp_path / "from_dicom.nii.gz")
    back = read_volume(tmp_path / "from_dicom.nii.gz")
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)


def test_dicom_folder_with_two_series_uses_the_largest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_dicom_series(_ct_like((8, 8, 3)), tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.21", prefix="a")
    _write_dicom_series(_ct_like((8, 8, 6)), tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.22", prefix="b")
    with caplog.at_level(logging.INFO, logger="fedseg.common.data.io"):
        volume = read_volume(tmp_path / "dicom")
    assert volume.shape == (6, 8, 8)
    assert "2 DICOM series" in caplog.text and "1.2.826.0.1.3680043.2.1125.22" in caplog.text


# --- read failures: DataError naming the file -------------------------------------------------------------


def _truncated_gz(tmp_path: Path, real_ct_path: Path) -> Path:
    data = real_ct_path.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_nii(tmp_path: Path, real_ct_path: Path) -> Path:
    data = gzip.decompress(real_ct_path.read_bytes())
    path = tmp_path / "truncated.nii"
    path.write_bytes(data[:1000])
    return path


def _zero(tmp_path: Path, _: Path) -> Path:
    path = tmp_path / "zero.nii.gz"
    path.touch()
    return path


def _text(tmp_path: Path, _: Path) -> Path:
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image\n")
    return path


def _two_d(tmp_path: Path, _: Path) -> Path:
    return _write_sitk(np.zeros((16, 16), np.int16), tmp_path / "flat.nii.gz")


def _four_d(tmp_path: Path, _: Path) -> Path:
    image = sitk.JoinSeries([sitk.Image(8, 8, 8, sitk.sitkInt16)] * 2)
    sitk.WriteImage(image, str(tmp_path / "series.nii.gz"))
    return tmp_path / "series.nii.gz"


def _missing(tmp_path: Path, _: Path) -> Path:
    return tmp_path / "absent.nii.gz"


def _no_dicom(tmp_path: Path, _: Path) -> Path:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "readme.txt").write_text("no images here")
    return tmp_path / "empty_dir"


def _wrong_suffix(tmp_path: Path, _: Path) -> Path:
    path = tmp_path / "scan.mha"
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkInt16), str(path))
    return path


def _nan(tmp_path: Path, _: Path) -> Path:
    array = np.zeros((4, 4, 4), np.float32)
    array[1, 2, :3] = (np.nan, np.inf, -np.inf)
    return _write_sitk(array, tmp_path / "nan.nii.gz")


def _nan_double_uncompressed(tmp_path: Path, _: Path) -> Path:
    array = np.zeros((4, 4, 4), np.float64)
    array[0, 0, 0] = np.nan
    return _write_sitk(array, tmp_path / "nan.nii")


BAD_INPUTS = {
    "zero-byte": (_zero, "empty"),
    "truncated .nii.gz": (_truncated_gz, "truncated"),
    "truncated .nii": (_truncated_nii, "truncated"),
    "text named .nii.gz": (_text, "not a gzip-compressed NIfTI"),
    "2D": (_two_d, "2D image"),
    "4D": (_four_d, "4D image"),
    "missing": (_missing, "no such file"),
    "folder without DICOM": (_no_dicom, "no DICOM series"),
    "unsupported suffix": (_wrong_suffix, "unsupported file type"),
    "NaN and inf voxels (float32)": (_nan, "3 NaN/infinite voxels"),  # ITK 5 would read them as 0
    "NaN voxel (float64, .nii)": (_nan_double_uncompressed, "1 NaN/infinite voxels"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_raises_one_line_data_error_naming_the_file(kind: str, tmp_path: Path, real_ct_path: Path) -> None:
    make, expected = BAD_INPUTS[kind]
    path = make(tmp_path, real_ct_path)
    with pytest.raises(DataError) as info:
        read_volume(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_4d_with_one_frame_reads_as_3d(tmp_path: Path) -> None:
    image = sitk.JoinSeries([sitk.Image(6, 5, 4, sitk.sitkInt16)])
    sitk.WriteImage(image, str(tmp_path / "one_frame.nii.gz"))
    assert read_volume(tmp_path / "one_frame.nii.gz").shape == (4, 5, 6)
