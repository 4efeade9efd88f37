"""Lossless reorientation: put one volume's voxels onto another grid that holds the same physical voxels.

Two files of one scan often store the same voxel centres in another axis order or direction (a DICOM series and
the NIfTI a converter wrote from it, one of them flipped along y, say). Mapping one onto the other then needs
only axis permutations and flips of the array, never interpolation. :func:`reorient_onto` does exactly that and
refuses (returns None) whenever the grids differ by anything else, so callers can still refuse a real resampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedseg.common.data.io import Volume

_AXES = "xyz"


@dataclass(frozen=True)
class Reorientation:
    """How a volume was rearranged: for each target index axis (x, y, z), the source axis and whether it flips."""

    source_axes: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        """True when nothing moves."""
        return self.source_axes == (0, 1, 2) and not any(self.flipped)

    def describe(self) -> str:
        """E.g. ``"flipped y"`` or ``"axes x,y,z from z,y,x"``."""
        parts = []
        if self.source_axes != (0, 1, 2):
            parts.append("axes x,y,z from " + ",".join(_AXES[a] for a in self.source_axes))
        flips = [_AXES[a] for a, flip in enumerate(self.flipped) if flip]
        if flips:
            parts.append("flipped " + ",".join(flips))
        return "; ".join(parts) or "unchanged"


def same_grid(a: Volume, b: Volume, tolerance: float) -> bool:
    """True when shape matches exactly and spacing, origin (mm) and direction cosines agree within ``tolerance``."""
    return (
        a.shape == b.shape
        and np.allclose(a.spacing, b.spacing, rtol=0.0, atol=tolerance)
        and np.allclose(a.origin, b.origin, rtol=0.0, atol=tolerance)
        and np.allclose(a.direction, b.direction, rtol=0.0, atol=tolerance)
    )


def reorient_onto(volume: Volume, target: Volume, tolerance: float) -> tuple[Volume, Reorientation] | None:
    """``volume``'s voxels rearranged onto ``target``'s grid by axis permutations and flips only.

    Args:
        volume: the volume to move (its array is copied, never interpolated).
        target: the grid to land on (only its geometry and shape are used).
        tolerance: allowed difference of spacing / origin (mm) and direction cosines after the move.

    Returns:
        ``(moved volume with target's geometry, what was done)``, or None when the two grids do not hold the same
        physical voxel centres (anything that would need resampling).
    """
    src_dir = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    dst_dir = np.asarray(target.direction, dtype=float).reshape(3, 3)
    dots = dst_dir.T @ src_dir  # [target axis, source axis]
    source_axes = tuple(int(np.argmax(np.abs(row))) for row in dots)
    if sorted(source_axes) != [0, 1, 2]:
        return None
    signs = [float(np.sign(dots[t, s])) for t, s in enumerate(source_axes)]
    if any(abs(abs(dots[t, s]) - 1.0) > tolerance for t, s in enumerate(source_axes)):
        return None
    flipped = (signs[0] < 0, signs[1] < 0, signs[2] < 0)
    moved = _apply(volume, (source_axes[0], source_axes[1], source_axes[2]), flipped)
    if not same_grid(moved, target, tolerance):
        return None
    result = Volume(array=moved.array, spacing=target.spacing, origin=target.origin, direction=target.direction)
    return result, Reorientation((source_axes[0], source_axes[1], source_axes[2]), flipped)


def _apply(volume: Volume, source_axes: tuple[int, int, int], flipped: tuple[bool, bool, bool]) -> Volume:
    """Permute and flip ``volume`` (axes in x, y, z index order) and compute the resulting exact geometry."""
    array_xyz = volume.array.transpose(2, 1, 0)
    spacing_xyz = np.asarray(volume.spacing[::-1], dtype=float)
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    origin = np.asarray(volume.origin, dtype=float)
    sizes = array_xyz.shape
    new_array = array_xyz.transpose(source_axes)
    new_dir = direction[:, list(source_axes)].copy()
    new_spacing = spacing_xyz[list(source_axes)]
    for axis, flip in enumerate(flipped):
        if flip:
            source = source_axes[axis]
            origin = origin + direction[:, source] * spacing_xyz[source] * (sizes[source] - 1)
            new_dir[:, axis] *= -1.0
            new_array = np.flip(new_array, axis=axis)
    return Volume(
        array=np.ascontiguousarray(new_array.transpose(2, 1, 0)),
        spacing=(float(new_spacing[2]), float(new_spacing[1]), float(new_spacing[0])),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=tuple(float(v) for v in new_dir.ravel()),
    )
