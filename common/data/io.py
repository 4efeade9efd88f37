# mypy: untyped-calls-exclude=SimpleITK
"""Read and write 3D medical volumes; the one place that fixes fedseg's spatial convention.

Convention (used everywhere in fedseg):

* ``Volume.array`` is a numpy array in ``(z, y, x)`` order, exactly SimpleITK's ``GetArrayFromImage`` order.
* ``Volume.spacing`` is in millimetres in the same ``(z, y, x)`` order as the array axes.
* ``Volume.origin`` and ``Volume.direction`` stay in SimpleITK's physical ``(x, y, z)`` convention (LPS), so
  ``origin`` is the physical position of voxel ``array[0, 0, 0]`` and ``direction`` is the row-major 3x3
  matrix whose columns are the x, y and z index axes.

Supported inputs are NIfTI files (``.nii``, ``.nii.gz``) and DICOM series folders; output is always NIfTI.
(About 300 lines: reading, header checks and writing of both formats stay together so the convention has one home.)
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from fedseg.common.errors import DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_CHUNK = 1 << 22  # 4 MiB decompression chunks
_NIFTI_FLOAT_CODES = ("16", "64")  # NIfTI datatype codes of float32 and float64


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image or label map with its physical geometry.

    Attributes:
        array: voxel values, shape ``(Z, Y, X)``.
        spacing: voxel size in mm, ``(z, y, x)``.
        origin: physical position of voxel ``[0, 0, 0]`` in mm, SimpleITK ``(x, y, z)``.
        direction: 9 direction cosines, SimpleITK row-major order.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume needs a 3D (z, y, x) array, got shape {self.array.shape}")
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Volume needs 3 spacing values, 3 origin values and 9 direction cosines")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(Z, Y, X)``."""
        z, y, x = self.array.shape
        return int(z), int(y), int(x)

    def to_sitk(self) -> sitk.Image:
        """Return a SimpleITK image with this array and geometry (bool arrays become uint8)."""
        array = self.array.astype(np.uint8) if self.array.dtype == np.bool_ else self.array
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(tuple(reversed(self.spacing)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """Build a Volume from a 3D scalar SimpleITK image.

        Raises:
            ValueError: the image is not 3D or not scalar.
        """
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"Volume.from_sitk needs a 3D scalar image, got {image.GetDimension()}D with "
                f"{image.GetNumberOfComponentsPerPixel()} components"
            )
        sx, sy, sz = image.GetSpacing()
        ox, oy, oz = image.GetOrigin()
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=(float(sz), float(sy), float(sx)),
            origin=(float(ox), float(oy), float(oz)),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def with_array(self, array: np.ndarray) -> Volume:
        """Return a Volume with ``array`` (same shape ``(Z, Y, X)``) on this volume's grid.

        Raises:
            ValueError: ``array`` has a different shape.
        """
        if array.shape != self.array.shape:
            raise ValueError(f"with_array needs shape {self.array.shape}, got {array.shape}")
        return Volume(array=array, spacing=self.spacing, origin=self.origin, direction=self.direction)


def is_nifti(path: Path) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI file or a DICOM series folder into a :class:`Volume`.

    Args:
        path: a ``.nii`` / ``.nii.gz`` file, or a folder of DICOM series (the largest series is used).

    Returns:
        The volume, array ``(Z, Y, X)`` in the file's pixel type.

    Raises:
        DataError: missing path, empty/truncated/corrupt file, unsupported format, no DICOM series,
            NaN/infinite voxels, or an image that is not a 3D scalar volume. The message names the path.
    """
    path = Path(path)
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        elif path.is_file():
            image = _read_nifti(path)
        else:
            raise DataError(f"{path}: no such file or folder; check the path")
    except OSError as err:  # permissions, I/O errors on a network share, ...
        raise DataError(f"{path}: cannot read ({err.strerror or err}); check the file and its permissions") from None
    return _to_volume(image, path)


def write_volume(volume: Volume, path: str | Path) -> None:
    """Write ``volume`` as NIfTI (``.nii`` or ``.nii.gz``) with its exact geometry; creates parent folders.

    Raises:
        ValueError: ``path`` does not end in ``.nii`` or ``.nii.gz``.
        DataError: the file cannot be written (the message names it).
    """
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"write_volume writes NIfTI only; name the file *.nii or *.nii.gz, got {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume.to_sitk(), str(path), useCompression=path.name.lower().endswith(".gz"))
    except (OSError, RuntimeError) as err:
        raise DataError(f"{path}: cannot write ({_short_message(err)}); check the folder is writable") from None


def _to_volume(image: sitk.Image, path: Path) -> Volume:
    """Check that ``image`` is a 3D scalar volume and wrap it."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} values per voxel (colour or vector image); "
            "provide a single-channel 3D volume"
        )
    if image.GetDimension() != 3:
        raise DataError(
            f"{path}: is a {image.GetDimension()}D image of size {image.GetSize()}; fedseg needs a 3D volume"
        )
    return Volume.from_sitk(image)


def _read_nifti(path: Path) -> sitk.Image:
    """Read a NIfTI file with SimpleITK, rejecting empty, truncated and non-NIfTI files."""
    if not is_nifti(path):
        raise DataError(f"{path}: unsupported file type; use NIfTI (.nii, .nii.gz) or a DICOM series folder")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes); copy it again")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise DataError(f"{path}: {_diagnose_unreadable(path)}") from None
    _check_complete(path, _expected_length(image, path))
    if image.GetMetaData("datatype") in _NIFTI_FLOAT_CODES:
        _check_finite(path)
    return image


def _diagnose_unreadable(path: Path) -> str:
    """Explain why SimpleITK could not read ``path`` (called only after a failure)."""
    with path.open("rb") as handle:
        magic = handle.read(2)
    if path.name.lower().endswith(".gz") and magic != b"\x1f\x8b":
        return "not a gzip-compressed NIfTI file (wrong content for the .nii.gz name); re-export it as NIfTI"
    return "not a readable NIfTI image (corrupt, or another format under a NIfTI name); re-export it"


def _check_complete(path: Path, expected: int) -> None:
    """Raise DataError when the file holds fewer voxel bytes than its header promises.

    SimpleITK silently zero-fills truncated NIfTI files, so the length is checked against the header.
    """
    actual: int | None
    if not path.name.lower().endswith(".gz"):
        actual = path.stat().st_size
    elif _gzip_trailer_length(path) == expected % (1 << 32):
        return
    else:
        actual = _gzip_length(path)
    if actual is None:
        raise DataError(f"{path}: file is truncated or corrupt (the compressed data is cut short); copy it again")
    if actual < expected:
        raise DataError(f"{path}: file is truncated ({actual} of {expected} bytes); copy it again")


def _expected_length(image: sitk.Image, path: Path) -> int:
    """Bytes a complete NIfTI file needs (header, extensions, voxels), from the header SimpleITK read."""
    try:
        ndim = int(image.GetMetaData("dim[0]"))
        dims = [int(image.GetMetaData(f"dim[{axis}]")) for axis in range(1, ndim + 1)]
        offset = int(float(image.GetMetaData("vox_offset")))
        bits = int(image.GetMetaData("bitpix"))
    except (RuntimeError, ValueError):
        raise DataError(f"{path}: NIfTI header lacks dim/vox_offset/bitpix fields; re-export it") from None
    return offset + math.prod(dims) * bits // 8


def _check_finite(path: Path) -> None:
    """Raise DataError when a float NIfTI file holds NaN or infinite voxels.

    ITK 5 (SimpleITK 2.x) silently reads non-finite voxels as 0, so the file is scanned once more with nibabel;
    only float files are affected, and CT is usually stored as int16.
    """
    try:
        image = nib.load(str(path))
        if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
            raise DataError(f"{path}: not a single-file NIfTI image; re-export it as .nii or .nii.gz")
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(image.dataobj))))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt NIfTI file ({_short_message(err)}); re-export it") from None
    if bad:
        raise DataError(f"{path}: {bad} NaN/infinite voxels; replace them (e.g. with -1000 HU) and save again")


def _gzip_trailer_length(path: Path) -> int:
    """The uncompressed length modulo 2**32 that the gzip trailer records (cheap: reads 4 bytes)."""
    with path.open("rb") as handle:
        handle.seek(-4, 2)
        (length,) = struct.unpack("<I", handle.read(4))
    return int(length)


def _gzip_length(path: Path) -> int | None:
    """Uncompressed length of a gzip file by decompressing it, or None when the stream is cut or corrupt."""
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        return None
    return total


def _read_dicom_series(folder: Path) -> sitk.Image:
    """Read the largest DICOM series in ``folder`` (not recursive)."""
    series = _dicom_series(folder)
    if not series:
        raise DataError(f"{folder}: no DICOM series in this folder; give a NIfTI file or a folder of DICOM slices")
    uid = max(series, key=lambda key: len(series[key]))
    if len(series) > 1:
        log.info(
            "%s holds %d DICOM series; using the largest, %s (%d files)",
            folder,
            len(series),
            uid,
            len(series[uid]),
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[uid])
    try:
        image: sitk.Image = reader.Execute()
    except RuntimeError as err:
        raise DataError(f"{folder}: cannot read DICOM series {uid} ({_short_message(err)}); check the files") from None
    if image.HasMetaDataKey("ITK_non_uniform_sampling_deviation"):
        log.warning("%s: DICOM slices are unevenly spaced (missing slices?); geometry is approximate", folder)
    return image


def _dicom_series(folder: Path) -> dict[str, tuple[str, ...]]:
    """Map each DICOM series UID found in ``folder`` to its sorted file names."""
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK prints "No Series were found" to stderr otherwise
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        series = {uid: tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    return {uid: files for uid, files in series.items() if files}


def _short_message(err: BaseException) -> str:
    """The last non-empty line of an exception message (ITK puts the useful part last)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
