"""Patch sampling for training: random crops with foreground oversampling, padding and augmentation.

For each patch the sampler picks a case uniformly. With probability ``foreground_prob`` the patch is centred on
a random voxel of a random foreground class that the case annotates and contains (nnU-Net's oversampling: without
it a small organ such as the pancreas rarely appears in a patch); otherwise its position is uniform inside the
volume. Patches that reach beyond the volume, or volumes smaller than the patch, are padded with the volume
minimum (the paper's padding) and label 0. With ``augment`` a larger in-plane context region is cropped and
:class:`~fedseg.common.data.augment.PatchAugmenter` turns it into the patch.

Everything random comes from ``numpy.random.default_rng(seed)`` (positions) and MONAI's seeded state
(augmentation), so one seed gives one sequence of batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from fedseg.common.data.augment import PatchAugmenter, context_size
from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.errors import DataError

#: At most this many voxels per class are kept as oversampling centres (a random subset, like nnU-Net).
MAX_CENTRES_PER_CLASS = 10_000


class Batch(NamedTuple):
    """One training batch.

    Attributes:
        image: float32 ``(B, 1, D, H, W)``.
        label: int64 ``(B, D, H, W)`` global class indices.
        class_mask: bool ``(B, C)``: which classes each sample's site annotates (background always True).
    """

    image: Tensor
    label: Tensor
    class_mask: Tensor


class PatchSampler:
    """An endless, seeded stream of :class:`Batch` es drawn from prepared, labelled cases.

    Iterate it (``for batch in sampler``) for an infinite stream, or take ``sampler.batches(n)`` per epoch.

    Args:
        cases: prepared cases, each with a label.
        patch_size: ``(D, H, W)`` voxels.
        batch_size: patches per batch.
        foreground_prob: probability that a patch is centred on a foreground voxel.
        augment: apply the paper's augmentation (:mod:`fedseg.common.data.augment`).
        seed: seeds positions and augmentation.
        affine_prob: with ``augment``, the probability that a patch gets the random affine.

    Raises:
        DataError: no cases, or a case without a label.
        ValueError: non-positive sizes or a probability outside [0, 1].
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        patch_size: tuple[int, int, int],
        batch_size: int = 2,
        foreground_prob: float = 0.33,
        augment: bool = True,
        seed: int = 0,
        affine_prob: float = 1.0,
    ) -> None:
        if not cases:
            raise DataError("no training cases; check that the site's dataset folder lists labelled images")
        unlabelled = [case.case_id for case in cases if case.label is None]
        if unlabelled:
            raise DataError(f"case {unlabelled[0]} has no label map; training needs a label for every case")
        if len(patch_size) != 3 or min(patch_size) <= 0 or batch_size <= 0 or not 0.0 <= foreground_prob <= 1.0:
            raise ValueError(
                f"need a positive (D, H, W) patch, batch_size >= 1 and foreground_prob in [0, 1]; got "
                f"{patch_size}, {batch_size}, {foreground_prob}"
            )
        self.cases = list(cases)
        self.patch_size = (int(patch_size[0]), int(patch_size[1]), int(patch_size[2]))
        self.batch_size = batch_size
        self.foreground_prob = foreground_prob
        self._rng = np.random.default_rng(seed)
        self._augmenter = PatchAugmenter(self.patch_size, seed, affine_prob) if augment else None
        self._centres = [foreground_centres(case, self._rng) for case in self.cases]
        self._fill = [float(case.image.min()) for case in self.cases]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def batches(self, count: int) -> Iterator[Batch]:
        """Yield ``count`` batches (e.g. one epoch), continuing the same random stream."""
        for _ in range(count):
            yield self.next_batch()

    def next_batch(self) -> Batch:
        """Draw one batch of ``batch_size`` patches."""
        images, labels, masks = [], [], []
        for _ in range(self.batch_size):
            index = int(self._rng.integers(len(self.cases)))
            image, label = self.sample_patch(index)
            images.append(image)
            labels.append(label)
            masks.append(self.cases[index].annotated)
        return Batch(
            image=torch.from_numpy(np.stack(images)[:, None]),
            label=torch.from_numpy(np.stack(labels).astype(np.int64)),
            class_mask=torch.tensor(masks, dtype=torch.bool),
        )

    def sample_patch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """One ``(D, H, W)`` patch of case ``index``: float32 image and uint8 label."""
        case = self.cases[index]
        label = case.label
        if label is None:  # excluded in __init__; keeps the type checker informed
            raise ValueError(f"case {case.case_id} has no label")
        centre = self._centre(index)
        size = context_size(self.patch_size) if self._augmenter is not None else self.patch_size
        start = tuple(c - s // 2 for c, s in zip(centre, size, strict=True))
        image = crop_padded(case.image, start, size, self._fill[index])
        region = crop_padded(label, start, size, 0)
        if self._augmenter is None:
            return image, region
        return self._augmenter(image, region)

    def _centre(self, index: int) -> tuple[int, ...]:
        """Patch centre: on a foreground voxel (oversampling) or uniform, kept inside larger-than-patch axes."""
        shape = self.cases[index].image.shape
        centres = self._centres[index]
        if centres and self._rng.random() < self.foreground_prob:
            voxels = centres[int(self._rng.choice(sorted(centres)))]
            wanted = [int(v) for v in np.unravel_index(int(self._rng.choice(voxels)), shape)]
        else:
            wanted = [int(self._rng.integers(dim)) for dim in shape]
        return tuple(_clamp_centre(c, dim, size) for c, dim, size in zip(wanted, shape, self.patch_size, strict=True))


def foreground_centres(case: PreparedCase, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Flat voxel indices per annotated foreground class present in ``case`` (at most ``MAX_CENTRES_PER_CLASS``)."""
    if case.label is None:
        return {}
    centres = {}
    for cls, annotated in enumerate(case.annotated):
        if cls == 0 or not annotated:
            continue
        voxels = np.flatnonzero(case.label == cls)
        if voxels.size > MAX_CENTRES_PER_CLASS:
            voxels = np.sort(rng.choice(voxels, MAX_CENTRES_PER_CLASS, replace=False))
        if voxels.size:
            centres[cls] = voxels
    return centres


def crop_padded(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """The ``size`` box of ``array`` starting at ``start`` (may be negative or overhang), padded with ``fill``."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape, strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _clamp_centre(centre: int, dim: int, size: int) -> int:
    """Move a centre so the patch stays inside an axis longer than the patch; centre shorter axes."""
    if dim <= size:
        return (dim - size) // 2 + size // 2
    return min(max(centre, size // 2), dim - size + size // 2)
