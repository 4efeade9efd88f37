# mypy: untyped-calls-exclude=SimpleITK
"""Preprocessing: canonical orientation, resampling to a target spacing, HU window, z-score, global labels.

Pipeline of :func:`preprocess_case` (all resampling by SimpleITK, in physical space):

1. **Orientation.** ``sitk.DICOMOrient`` to ``cfg.orientation`` (default ``"LPS"``, ITK's code: the x, y, z index
   axes point to the patient's Left, Posterior, Superior, i.e. identity direction cosines). Arrays are then
   ``(z, y, x)`` = (inferior→superior, anterior→posterior, right→left) whatever the scanner wrote (RAS NIfTI,
   LPS DICOM, flipped slices). This is a pure axis permutation/flip: no interpolation.
2. **Resampling** to ``cfg.target_spacing`` (``(z, y, x)`` mm, default the paper's isotropic 2 mm). The new grid
   keeps the direction and is centred on the same physical box: ``round(size * spacing / target)`` voxels per
   axis. The image uses linear (or B-spline) interpolation after a Gaussian anti-aliasing filter on the axes
   being downsampled (σ = (target - spacing) / 2 mm); labels use nearest neighbour. Voxels that fall a fraction
   of a voxel outside the source take the nearest source value. The phantoms (:mod:`~fedseg.common.synthetic.phantoms`)
   are generated around this same 2 mm, so a default 64³ phantom becomes about 64 × 54–67 × 54–67 voxels.
3. **Labels** go through the site's :class:`~fedseg.common.data.manifest.LabelManifest` to global class indices
   (0 background, 1 pancreas, 2 spleen, 3 kidney, 4 liver) before resampling.
4. **Intensity.** Clip to ``cfg.hu_window`` (default [-200, 300] HU: the abdominal soft-tissue window, wide enough
   for fat, organs and contrast vessels; bone and air saturate), then z-score to N(0, 1) as in the paper. With
   ``normalization="volume"`` (default, the paper's per-volume z-score) the mean and standard deviation are taken
   over the whole prepared volume; with ``"body"`` over voxels above ``body_threshold_hu`` (-500 HU) only, which
   makes the statistics independent of the field of view; with ``"site"`` over the body voxels of all of a
   site's cases pooled (one mean and sd per site, like nnU-Net's dataset statistics but per site, so a site's
   scanner calibration is removed while differences between its patients remain). :func:`preprocess_case` alone
   sees one volume, so under ``"site"`` it z-scores with that volume's body statistics and records them in
   :attr:`PreparedCase.intensity`; :func:`~fedseg.common.data.sitecache.site_normalised` then pools the records
   of a site's cases and maps every case onto the pooled statistics
   (:func:`~fedseg.common.data.sitecache.prepare_site` does this for each dataset folder, so every folder is one
   site).

:func:`restore_to_source` maps a label or probability map on the prepared grid back onto the source grid with
one physical-space resampling (nearest for labels, linear for probabilities); the result has exactly the source
shape, spacing, origin and direction. :func:`fedseg.common.data.sitecache.prepare_site` runs this over a whole
dataset folder with a disk cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedseg.common.data.intensity import IntensityStats
from fedseg.common.data.io import Volume
from fedseg.common.data.manifest import LabelManifest
from fedseg.common.errors import DataError

log = logging.getLogger(__name__)

_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


class PreprocessConfig(BaseModel):
    """How source CT volumes become network input (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_spacing: tuple[float, float, float] = Field(default=(2.0, 2.0, 2.0), description="(z, y, x) mm")
    orientation: str = Field(default="LPS", description="ITK DICOMOrient code of the prepared axes (x, y, z)")
    hu_window: tuple[float, float] = Field(default=(-200.0, 300.0), description="clip range in HU before z-score")
    normalization: Literal["volume", "body", "site"] = Field(
        default="volume",
        description="z-score statistics of the clipped HU: 'volume' (each volume's own), 'body' (each volume's "
        "voxels above body_threshold_hu) or 'site' (body voxels of all of a site's cases pooled, computed where "
        "the site prepares its data and never sent; a single volume predicted alone uses its own body statistics)",
    )
    body_threshold_hu: float = Field(
        default=-500.0, description="HU above which a voxel is body, for normalization = body or site"
    )
    interpolation: Literal["linear", "bspline"] = Field(
        default="linear", description="image resampling to target_spacing (labels always nearest neighbour)"
    )
    antialias: bool = Field(default=True, description="Gaussian smoothing before downsampling an image")

    @field_validator("target_spacing")
    @classmethod
    def _positive_spacing(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError(f"target spacing must be positive millimetres, got {value}")
        return value

    @field_validator("orientation")
    @classmethod
    def _orientation_code(cls, value: str) -> str:
        code = value.upper()
        if len(code) != 3 or any(len(pair & set(code)) != 1 for pair in _AXIS_PAIRS):
            raise ValueError(
                f"orientation must be a 3-letter code with one of L/R, A/P, S/I each (e.g. LPS), got {value!r}"
            )
        return code

    @model_validator(mode="after")
    def _window_order(self) -> PreprocessConfig:
        low, high = self.hu_window
        if not low < high:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        return self


@dataclass(frozen=True)
class Grid:
    """A voxel grid in physical space (the geometry of a :class:`~fedseg.common.data.io.Volume` without values).

    Attributes:
        shape: ``(Z, Y, X)``.
        spacing: ``(z, y, x)`` mm.
        origin: physical position of voxel ``[0, 0, 0]``, SimpleITK ``(x, y, z)``.
        direction: 9 direction cosines, SimpleITK row-major order.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of_image(cls, image: sitk.Image) -> Grid:
        """The grid of a 3D SimpleITK image."""
        x, y, z = (int(v) for v in image.GetSize())
        sx, sy, sz = (float(v) for v in image.GetSpacing())
        ox, oy, oz = (float(v) for v in image.GetOrigin())
        return cls((z, y, x), (sz, sy, sx), (ox, oy, oz), tuple(float(v) for v in image.GetDirection()))

    def image(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image holding ``array`` (shape ``(Z, Y, X)``) on this grid."""
        if array.shape != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.shape}")
        return Volume(array=array, spacing=self.spacing, origin=self.origin, direction=self.direction).to_sitk()


@dataclass(frozen=True)
class SourceGeometry:
    """Where a prepared case came from: the source grid and the prepared grid (both physical)."""

    grid: Grid
    prepared: Grid


@dataclass(frozen=True, eq=False)
class PreparedCase:
    """One case ready for training or inference.

    Attributes:
        case_id: the case's id in its dataset.
        image: normalised intensities, float32 ``(Z, Y, X)`` on the prepared grid.
        label: global class indices, uint8 ``(Z, Y, X)``, or None for unlabelled cases.
        annotated: one flag per global class (background first): is the class annotated for this case.
        source: source and prepared grids, for :func:`restore_to_source`.
        intensity: the statistics ``image`` was z-scored with (None in caches written before they were kept).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    annotated: tuple[bool, ...]
    source: SourceGeometry
    intensity: IntensityStats | None = None


def preprocess_case(
    image: Volume,
    label: Volume | None,
    manifest: LabelManifest,
    cfg: PreprocessConfig,
    case_id: str = "case",
) -> PreparedCase:
    """Orient, resample, normalise one image and map its label to global classes.

    Args:
        image: source CT in HU, any orientation and spacing.
        label: source label map on the image grid, in the site's numbering, or None.
        manifest: the site's label mapping (source value -> global class, annotated classes).
        cfg: target spacing, orientation, HU window and normalisation.
        case_id: recorded in the result and in error messages.

    Returns:
        The prepared case; ``image`` float32 and ``label`` uint8, both ``(Z, Y, X)`` on the prepared grid.

    Raises:
        DataError: the label is not on the image grid, or holds values the manifest does not map.
    """
    source = image.to_sitk()
    grid = Grid.of_image(source)
    oriented = sitk.DICOMOrient(sitk.Cast(source, sitk.sitkFloat32), cfg.orientation)
    target = target_grid(Grid.of_image(oriented), cfg.target_spacing)
    if cfg.antialias:
        oriented = _antialias(oriented, target)
    interpolator = sitk.sitkLinear if cfg.interpolation == "linear" else sitk.sitkBSpline
    hu = sitk.GetArrayFromImage(_resample(oriented, target, interpolator))
    prepared_label = None
    if label is not None:
        _check_same_grid(image, label, case_id)
        try:
            global_label = manifest.to_global(label.array).astype(np.uint8)
        except DataError as err:
            raise DataError(f"case {case_id}: {err}") from None
        oriented_label = sitk.DICOMOrient(grid.image(global_label), cfg.orientation)
        prepared_label = sitk.GetArrayFromImage(_resample(oriented_label, target, sitk.sitkNearestNeighbor))
    stats = region_statistics(hu, cfg)
    return PreparedCase(
        case_id=case_id,
        image=normalise(hu, cfg, stats),
        label=prepared_label,
        annotated=manifest.annotated_mask(),
        source=SourceGeometry(grid=grid, prepared=target),
        intensity=stats,
    )


def target_grid(grid: Grid, spacing: tuple[float, float, float]) -> Grid:
    """The grid with ``spacing`` ``(z, y, x)`` covering the same physical box as ``grid`` (same centre/direction)."""
    direction = np.asarray(grid.direction).reshape(3, 3)
    size = np.asarray(grid.shape[::-1], float)
    old, new = np.asarray(grid.spacing[::-1]), np.asarray(spacing[::-1], float)
    new_size = np.maximum(1, np.round(size * old / new)).astype(int)
    centre = np.asarray(grid.origin) + direction @ ((size - 1) * old / 2)
    origin = centre - direction @ ((new_size - 1) * new / 2)
    x, y, z = (int(v) for v in new_size)
    ox, oy, oz = (float(v) for v in origin)
    return Grid((z, y, x), (float(spacing[0]), float(spacing[1]), float(spacing[2])), (ox, oy, oz), grid.direction)


def region_statistics(hu: np.ndarray, cfg: PreprocessConfig) -> IntensityStats:
    """Statistics of the clipped ``hu`` over the region ``cfg.normalization`` z-scores with.

    The whole volume for ``"volume"``; the voxels above ``cfg.body_threshold_hu`` for ``"body"`` and ``"site"``
    (the whole volume when fewer than 2 are).
    """
    clipped = np.clip(hu, *cfg.hu_window).astype(np.float32)
    region = clipped[hu > cfg.body_threshold_hu] if cfg.normalization != "volume" else clipped
    if region.size < 2:
        region = clipped
    return IntensityStats(float(region.mean(dtype=np.float64)), float(region.std(dtype=np.float64)), region.size)


def normalise(hu: np.ndarray, cfg: PreprocessConfig, stats: IntensityStats | None = None) -> np.ndarray:
    """Clip HU to ``cfg.hu_window`` and z-score with ``stats`` (default: :func:`region_statistics` of ``hu``).

    Returns:
        float32 array of ``hu``'s shape; all zeros for a constant image.
    """
    stats = stats if stats is not None else region_statistics(hu, cfg)
    clipped = np.clip(hu, *cfg.hu_window).astype(np.float32)
    result: np.ndarray = (clipped - np.float32(stats.mean)) / np.float32(stats.scale)
    return result


def restore_to_source(array: np.ndarray, case: PreparedCase, is_label: bool) -> Volume:
    """Map an array on ``case``'s prepared grid back onto its source grid (inverse orientation and resampling).

    Args:
        array: ``(Z, Y, X)`` on the prepared grid: a label map (integers) or one probability/score channel.
        case: the prepared case whose ``source`` geometry to restore.
        is_label: nearest-neighbour interpolation (labels keep their values) instead of linear.

    Returns:
        A Volume with exactly the source shape, spacing, origin and direction; labels keep ``array``'s integer
        dtype (bool becomes uint8), other values become float32.

    Raises:
        ValueError: ``array`` does not have the prepared shape.
    """
    prepared = case.source.prepared
    if array.shape != prepared.shape:
        raise ValueError(f"restore_to_source needs the prepared shape {prepared.shape}, got {array.shape}")
    values = array if is_label else array.astype(np.float32)
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return Volume.from_sitk(_resample(prepared.image(values), case.source.grid, interpolator))


def _resample(image: sitk.Image, grid: Grid, interpolator: int) -> sitk.Image:
    """Resample ``image`` onto ``grid`` in physical space; points just outside take the nearest value."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(grid.shape[::-1])
    resampler.SetOutputSpacing(grid.spacing[::-1])
    resampler.SetOutputOrigin(grid.origin)
    resampler.SetOutputDirection(grid.direction)
    resampler.SetInterpolator(interpolator)
    resampler.SetOutputPixelType(image.GetPixelID())
    resampler.SetUseNearestNeighborExtrapolator(True)
    result: sitk.Image = resampler.Execute(image)
    return result


def _antialias(image: sitk.Image, target: Grid) -> sitk.Image:
    """Gaussian pre-filter along axes that are downsampled (σ = (new - old) / 2 mm), else ``image`` itself."""
    old = np.asarray(image.GetSpacing())
    sigma = np.maximum(0.0, (np.asarray(target.spacing[::-1]) - old) / 2)
    if not sigma.any():
        return image
    result: sitk.Image = sitk.DiscreteGaussian(image, [float(s) ** 2 for s in sigma], 32, 0.01, True)
    return result


def _check_same_grid(image: Volume, label: Volume, case_id: str) -> None:
    """Raise DataError unless ``label`` lies on ``image``'s grid (sub-voxel header differences are tolerated)."""
    if image.shape != label.shape:
        raise DataError(
            f"case {case_id}: label shape {label.shape} differs from image shape {image.shape}; "
            "the label map must be on the image grid"
        )
    tolerance = 0.1 * min(image.spacing)
    if (
        not np.allclose(image.spacing, label.spacing, rtol=1e-3)
        or not np.allclose(image.origin, label.origin, atol=tolerance)
        or not np.allclose(image.direction, label.direction, atol=1e-3)
    ):
        raise DataError(
            f"case {case_id}: label geometry (spacing {label.spacing}, origin {label.origin}) differs from the "
            f"image's ({image.spacing}, {image.origin}); resample the label onto the image grid"
        )
