"""Intensity statistics of clipped HU (see :mod:`fedseg.common.data.preprocess`, step 4).

:class:`IntensityStats` is what a volume is z-scored with;
:func:`~fedseg.common.data.preprocess.region_statistics` measures them on one volume over the region
``normalization`` names, :meth:`IntensityStats.pooled` merges those of a site's cases (``normalization = "site"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class IntensityStats:
    """Mean and standard deviation (HU, population sd) of clipped intensities over ``voxels`` voxels."""

    mean: float
    std: float
    voxels: int

    @property
    def scale(self) -> float:
        """The divisor of the z-score (``std``, kept away from 0 so a constant image maps to zeros)."""
        return max(self.std, 1e-6)

    @classmethod
    def pooled(cls, parts: Sequence[IntensityStats]) -> IntensityStats:
        """The statistics of the union of the parts' voxels (law of total variance, weights = voxel counts).

        Raises:
            ValueError: no part, or no voxel at all.
        """
        total = sum(p.voxels for p in parts)
        if total == 0:
            raise ValueError("cannot pool intensity statistics over no voxels")
        mean = sum(p.voxels * p.mean for p in parts) / total
        var = sum(p.voxels * (p.std**2 + (p.mean - mean) ** 2) for p in parts) / total
        return cls(mean=mean, std=math.sqrt(var), voxels=total)
