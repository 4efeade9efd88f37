"""fedseg.common.data.orientation: permutations and flips onto the same physical voxels, nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.common.data.io import Volume
from fedseg.common.data.orientation import reorient_onto

TOL = 1e-3


def grid() -> Volume:
    """A (z, y, x) = (2, 3, 4) volume of distinct values with anisotropic spacing and an offset origin."""
    return Volume(
        array=np.arange(24, dtype=np.int16).reshape(2, 3, 4),
        spacing=(2.5, 0.8, 0.7),
        origin=(-10.0, 20.0, 5.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )


def voxel_positions(volume: Volume) -> dict[tuple[float, float, float], int]:
    """Physical centre (rounded to 1e-6 mm) -> value, computed from the geometry by hand."""
    direction = np.asarray(volume.direction).reshape(3, 3)
    spacing_xyz = np.asarray(volume.spacing[::-1])
    found = {}
    for (z, y, x), value in np.ndenumerate(volume.array):
        point = np.asarray(volume.origin) + direction @ (spacing_xyz * np.array([x, y, z]))
        found[tuple(np.round(point, 6))] = int(value)
    return found


def test_y_flip_with_moved_origin_is_undone_exactly() -> None:
    ref = grid()
    # flipped along y on disk: y row 0 is now the last row, origin moves 2 rows * 0.8 mm, y direction negated
    flipped = Volume(
        array=ref.array[:, ::-1, :].copy(),
        spacing=ref.spacing,
        origin=(-10.0, 21.6, 5.0),
        direction=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    )
    assert voxel_positions(flipped) == voxel_positions(ref)  # the same physical voxels
    moved = reorient_onto(flipped, ref, TOL)
    assert moved is not None
    volume, how = moved
    np.testing.assert_array_equal(volume.array, ref.array)
    assert how.describe() == "flipped y" and volume.origin == ref.origin


def test_axis_permutation_and_flip_is_undone_exactly() -> None:
    ref = grid()
    # stored as x,y swapped and z reversed: index axes (x', y', z') = (y, x, -z)
    swapped = Volume(
        array=ref.array.transpose(0, 2, 1)[::-1].copy(),
        spacing=(2.5, 0.7, 0.8),
        origin=(-10.0, 20.0, 7.5),
        direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    )
    assert voxel_positions(swapped) == voxel_positions(ref)
    moved = reorient_onto(swapped, ref, TOL)
    assert moved is not None
    np.testing.assert_array_equal(moved[0].array, ref.array)
    assert moved[1].describe() == "axes x,y,z from y,x,z; flipped z"


@pytest.mark.parametrize(
    "change",
    [
        {"origin": (-10.0, 21.2, 5.0)},  # flipped but half a voxel off: needs interpolation
        {"origin": (-10.0, 21.6, 5.0), "spacing": (2.5, 0.9, 0.7)},  # other spacing
        {"origin": (-10.0, 21.6, 5.0), "direction": (1.0, 0.0, 0.0, 0.0, -0.9, 0.436, 0.0, 0.436, 0.9)},  # oblique
    ],
)
def test_anything_needing_resampling_is_refused(change: dict[str, tuple[float, ...]]) -> None:
    ref = grid()
    fields = {
        "array": ref.array[:, ::-1, :].copy(),
        "spacing": ref.spacing,
        "origin": ref.origin,
        "direction": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
        **change,
    }
    assert reorient_onto(Volume(**fields), ref, TOL) is None  # type: ignore[arg-type]


def test_other_shape_is_refused_and_identity_is_kept() -> None:
    ref = grid()
    assert reorient_onto(Volume(np.zeros((2, 3, 5)), ref.spacing, ref.origin, ref.direction), ref, TOL) is None
    moved = reorient_onto(ref, ref, TOL)
    assert moved is not None and moved[1].is_identity
