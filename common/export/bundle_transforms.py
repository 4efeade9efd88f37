"""MONAI components that give an exported bundle fedseg's exact preprocessing and window, with MONAI alone.

``fed-eval export --format bundle`` copies this file into the bundle as ``scripts/fedseg_transforms.py``, and
``configs/inference.json`` names its classes, so it imports only MONAI, torch, numpy and the standard library,
never fedseg. Three steps of fedseg's pipeline have no exact MONAI equivalent, so they are here:

* :class:`CentredSpacingd`: resampling to the target spacing on fedseg's grid, ``round(n * old / new)`` voxels
  per axis *centred* on the input's physical box (MONAI's ``Spacingd`` anchors the grid at the first voxel or
  edge instead: up to a quarter of a target voxel away), after ITK's discrete Gaussian anti-aliasing filter
  (σ = (new - old) / 2 mm on the downsampled axes, zero-flux borders), as SimpleITK applies it in fedseg.
* :class:`BodyZScored`: clip to the HU window and z-score with the statistics of the voxels above a body
  threshold (fedseg's ``normalization = "body"``, and ``"site"`` for one volume); ``"volume"`` needs no code
  here: MONAI's ``ScaleIntensityRanged`` + ``NormalizeIntensityd`` give it exactly.
* :class:`FittedWindowInferer`: MONAI's Gaussian sliding window with fedseg's window (the patch, shrunk per axis
  to the volume's side rounded up to a multiple of 16) and padding (the volume's minimum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config.type_definitions import KeysCollection
from monai.data.meta_tensor import MetaTensor
from monai.inferers.inferer import Inferer
from monai.inferers.utils import sliding_window_inference
from monai.transforms.inverse import InvertibleTransform
from monai.transforms.spatial.array import SpatialResample
from monai.transforms.transform import MapTransform
from monai.utils.enums import TraceKeys

#: Every spatial side of the network's input must be a multiple of this (four 2x poolings).
SIZE_MULTIPLE = 16
#: ITK DiscreteGaussian's defaults as fedseg calls it: kernel mass kept, and widest kernel (voxels).
GAUSSIAN_MAX_ERROR = 0.01
GAUSSIAN_MAX_WIDTH = 32


def scaled_bessel_i(order: int, t: float) -> float:
    """``exp(-t) * I_order(t)``, the modified Bessel function of the first kind, by its power series."""
    if t <= 0.0:
        return 1.0 if order == 0 else 0.0
    half = t / 2.0
    term = math.exp(order * math.log(half) - math.lgamma(order + 1) - t)
    total, k = 0.0, 0
    while term >= 1e-17 * total:
        total += term
        k += 1
        term *= half * half / (k * (k + order))
    return total


def discrete_gaussian(variance: float) -> np.ndarray:
    """Lindeberg's discrete Gaussian ``exp(-t) I_n(t)`` of variance ``t`` (voxels²), sized as ITK sizes it.

    Coefficients are added outwards until both tails together hold ``1 - GAUSSIAN_MAX_ERROR`` of the mass or the
    half-kernel reaches ``GAUSSIAN_MAX_WIDTH``, then normalised to sum 1. Returns the symmetric kernel.
    """
    half = [scaled_bessel_i(0, variance), scaled_bessel_i(1, variance)]
    total = half[0] + 2 * half[1]
    while total < 1.0 - GAUSSIAN_MAX_ERROR and len(half) <= GAUSSIAN_MAX_WIDTH:
        half.append(scaled_bessel_i(len(half), variance))
        total += 2 * half[-1]
        if half[-1] <= 0.0:
            break
    side = np.asarray(half, dtype=np.float64) / total
    return np.concatenate([side[:0:-1], side])


def smooth(image: torch.Tensor, variances: Sequence[float]) -> torch.Tensor:
    """Separable discrete Gaussian over the spatial axes of a channel-first ``image`` (replicated borders)."""
    out = image.as_tensor() if isinstance(image, MetaTensor) else image
    out = out.to(torch.float64)[None]  # (1, C, X, Y, Z)
    for axis, variance in enumerate(variances):
        if variance <= 0:
            continue
        kernel = torch.as_tensor(discrete_gaussian(float(variance)), dtype=torch.float64)
        radius = (kernel.numel() - 1) // 2
        moved = out.movedim(axis + 2, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        flat = F.conv1d(F.pad(flat, (radius, radius), mode="replicate"), kernel.view(1, 1, -1))
        out = flat.reshape(moved.shape).movedim(-1, axis + 2)
    return out[0].to(torch.float32)


def centred_grid(
    affine: np.ndarray, shape: Sequence[int], pixdim: Sequence[float]
) -> tuple[np.ndarray, tuple[int, ...]]:
    """fedseg's target grid: ``pixdim`` spacing, the same directions, centred on the same physical box.

    Args:
        affine: the input's 4x4 voxel-to-world matrix.
        shape: the input's spatial shape, in the affine's axis order.
        pixdim: the target spacing in that order (mm).

    Returns:
        The target's 4x4 affine and spatial shape (``round(n * old / new)`` voxels per axis, at least 1).
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    old = np.linalg.norm(linear, axis=0)
    new = np.asarray(pixdim, dtype=np.float64)
    size = np.asarray(shape, dtype=np.float64)
    out_size = np.maximum(1, np.round(size * old / new)).astype(int)
    directions = linear / old
    centre = np.asarray(affine, dtype=np.float64)[:3, 3] + linear @ ((size - 1) / 2)
    target = np.eye(4)
    target[:3, :3] = directions * new
    target[:3, 3] = centre - target[:3, :3] @ ((out_size - 1) / 2)
    return target, tuple(int(s) for s in out_size)


def nearest_resample(image: torch.Tensor, affine: np.ndarray, target: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """Resample channel-first ``image`` (on ``affine``) onto the grid ``target`` / ``shape`` by nearest neighbour.

    Each target voxel takes the voxel at ``floor(c + 0.5)`` of its continuous index ``c`` (clamped to the image),
    computed in float64 as ITK computes it: a voxel halfway between two is rounded up, as SimpleITK's resampler
    (and so fedseg) does; torch's ``grid_sample`` would round it to even. Done one target slice at a time.
    """
    to_index = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    origin = np.asarray(affine, dtype=np.float64)[:3, 3:4]
    linear, offset = np.asarray(target, dtype=np.float64)[:3, :3], np.asarray(target, dtype=np.float64)[:3, 3:4]
    limit = np.asarray(image.shape[1:])[:, None] - 1
    grid = np.indices(tuple(shape[:2]), dtype=np.float64).reshape(2, -1)
    out = torch.empty((image.shape[0], *shape), dtype=image.dtype)
    for k in range(int(shape[2])):
        index = np.concatenate([grid, np.full((1, grid.shape[1]), float(k))])
        continuous = to_index @ (linear @ index + offset - origin)
        nearest = np.clip(np.floor(continuous + 0.5), 0, limit).astype(np.int64)
        picked = image[:, nearest[0], nearest[1], nearest[2]]
        out[..., k] = picked.reshape(image.shape[0], int(shape[0]), int(shape[1]))
    return out


class CentredSpacingd(MapTransform, InvertibleTransform):
    """Resample to ``pixdim`` on fedseg's centred grid, after its anti-aliasing filter; invertible.

    Args:
        keys: the images to resample (channel-first MetaTensors).
        pixdim: target spacing per array axis (mm), in MONAI's axis order (x, y, z after ``Orientationd``).
        mode: ``"bilinear"`` (fedseg's linear interpolation) or a spline order; the inverse of a label map
            uses nearest neighbour when ``Invertd`` asks for it (``nearest_interp``).
        antialias: smooth the axes being downsampled first (fedseg's ``antialias``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float],
        mode: str | int = "bilinear",
        antialias: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pixdim = tuple(float(p) for p in pixdim)
        self.antialias = antialias
        self.resample = SpatialResample(mode=mode, padding_mode="border", dtype=np.float64)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._one(d[key])
        return d

    def _one(self, image: MetaTensor) -> torch.Tensor:
        affine = image.affine.numpy()
        target, shape = centred_grid(affine, image.shape[1:], self.pixdim)
        if self.antialias:
            old = np.linalg.norm(affine[:3, :3], axis=0)
            sigma = np.maximum(0.0, (np.asarray(self.pixdim) - old) / 2)
            smoothed = smooth(image, (sigma / old) ** 2)
            image = MetaTensor(smoothed, meta=image.meta, applied_operations=image.applied_operations)
        return self.resample(image, dst_affine=torch.as_tensor(target), spatial_size=shape)

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._undo(d[key])
        return d

    def _undo(self, image: MetaTensor) -> torch.Tensor:
        """Back onto the input's grid; nearest neighbour (``Invertd(nearest_interp=True)``) rounds as ITK does."""
        trace = self.resample.get_most_recent_transform(image)
        info = trace[TraceKeys.EXTRA_INFO]
        if info["mode"] not in ("nearest", 0):
            return self.resample.inverse(image)
        self.resample.pop_transform(image)
        source = np.asarray(info["src_affine"], dtype=np.float64)
        shape = tuple(int(s) for s in trace[TraceKeys.ORIG_SIZE])
        prepared, _ = centred_grid(source, shape, self.pixdim)  # the grid __call__ resampled onto
        values = nearest_resample(image.as_tensor().cpu(), prepared, source, shape)
        meta = dict(image.meta)
        meta["affine"] = torch.as_tensor(source)
        return MetaTensor(values, meta=meta, applied_operations=image.applied_operations)


class BodyZScored(MapTransform):
    """Clip to ``window`` (HU) and z-score with the mean and sd of the voxels above ``threshold`` HU before
    clipping (all voxels when fewer than 2 are); a constant image becomes zeros."""

    def __init__(
        self,
        keys: KeysCollection,
        window: Sequence[float],
        threshold: float,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.low, self.high = float(window[0]), float(window[1])
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            clipped = image.clamp(self.low, self.high)
            region = clipped[image > self.threshold] if int((image > self.threshold).sum()) >= 2 else clipped
            values = region.as_tensor() if isinstance(region, MetaTensor) else region
            mean = values.double().mean()
            std = values.double().std(unbiased=False).clamp_min(1e-6)
            d[key] = ((clipped - mean.float()) / std.float()).float()
        return d


def fitted_window(shape: Sequence[int], patch: Sequence[int]) -> list[int]:
    """fedseg's window for a volume: the patch, shrunk per axis to the side rounded up to a multiple of 16."""
    return [min(int(p), SIZE_MULTIPLE * math.ceil(int(s) / SIZE_MULTIPLE)) for p, s in zip(patch, shape, strict=True)]


class FittedWindowInferer(Inferer):
    """Gaussian-weighted sliding window over the patch fitted to each volume, padded with the volume's minimum.

    Args:
        roi_size: the training patch (multiples of 16), in the network's axis order.
        sw_batch_size: windows per forward pass.
        overlap: overlap of neighbouring windows.
    """

    def __init__(self, roi_size: Sequence[int], sw_batch_size: int = 2, overlap: float = 0.5) -> None:
        self.roi_size = [int(r) for r in roi_size]
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Blend ``network``'s outputs over ``inputs`` (B, C, ...); keyword arguments go to the network."""
        return sliding_window_inference(
            inputs,
            roi_size=fitted_window(inputs.shape[2:], self.roi_size),
            sw_batch_size=self.sw_batch_size,
            predictor=network,
            overlap=self.overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(inputs.min()),
            **kwargs,
        )
