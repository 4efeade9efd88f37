"""The paper's training augmentation, applied per patch with MONAI transforms.

Oktay et al. (2018) used torchsample's ``cmr_3d_sax_transform``: in-plane flips along each in-plane axis
(p = 0.5 each) and one random **2-D in-plane affine shared by all slices**: rotation U(±15°), translation
U(±10 %) of the patch per axis, zoom U(0.7, 1.3) independently per axis; images bilinear, labels nearest.

To keep it cheap the affine runs on a crop around the patch, not on the whole volume: the sampler cuts a
context region of ``(D, ⌈1.8 H⌉, ⌈1.8 W⌉)`` voxels (:func:`context_size`) and MONAI's ``RandAffined`` resamples
it straight to the ``(H, W)`` patch around its centre. The slices are treated as channels of a 2-D image, which is
exactly "one affine shared by all slices" and ~10× faster than a 3-D grid. 1.8 covers the worst case:
zoom 1.3 × (cos 15° + sin 15°) ≈ 1.59 plus 2 × 10 % translation. Outside the region the image repeats its border
(the region itself is padded with the volume minimum) and the label is 0.

The paper's per-volume z-score happens in preprocessing (:mod:`fedseg.common.data.preprocess`), and its random crop
is the patch sampler's random patch position (:mod:`fedseg.common.data.sampling`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np
import torch
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import CenterSpatialCropd
from monai.transforms.spatial.dictionary import RandAffined, RandFlipd

#: Rotation range (degrees), translation (fraction of the patch), zoom half-range (1 ± this), flip probability.
ROTATION_DEG = 15.0
TRANSLATION = 0.1
ZOOM = 0.3
FLIP_PROB = 0.5
#: In-plane context factor around the patch fed to the affine (see the module docstring).
CONTEXT = 1.8

_KEYS = ("image", "label")


def context_size(patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """The ``(D, H', W')`` region to crop around a patch before :class:`PatchAugmenter` (in-plane enlarged)."""
    d, h, w = patch_size
    return d, math.ceil(CONTEXT * h), math.ceil(CONTEXT * w)


class PatchAugmenter:
    """Seeded in-plane affine + flips that turn a context region into an augmented patch.

    Args:
        patch_size: output ``(D, H, W)``.
        seed: seeds MONAI's random state; the same seed and call sequence give the same patches.
        affine_prob: probability that a patch gets the random affine (the paper: 1.0; nnU-Net uses ~0.2 per
            spatial transform). Otherwise the patch is the plain centre of the region. Flips stay at p = 0.5.
    """

    def __init__(self, patch_size: tuple[int, int, int], seed: int, affine_prob: float = 1.0) -> None:
        if not 0.0 <= affine_prob <= 1.0:
            raise ValueError(f"affine_prob must be in [0, 1], got {affine_prob}")
        _, h, w = patch_size
        self.patch_size = patch_size
        self.affine_prob = affine_prob
        self._rng = np.random.default_rng(seed)
        self._affine = RandAffined(
            keys=_KEYS,
            spatial_size=(h, w),
            prob=1.0,
            rotate_range=(math.radians(ROTATION_DEG),),
            translate_range=(TRANSLATION * h, TRANSLATION * w),
            scale_range=(ZOOM, ZOOM),
            mode=("bilinear", "nearest"),
            padding_mode=("border", "zeros"),
            cache_grid=True,
        )
        self._affine.set_random_state(seed=seed % 2**32)
        self._crop = CenterSpatialCropd(keys=_KEYS, roi_size=(h, w))
        self._flips = Compose(
            [
                RandFlipd(keys=_KEYS, prob=FLIP_PROB, spatial_axis=0),
                RandFlipd(keys=_KEYS, prob=FLIP_PROB, spatial_axis=1),
            ]
        )
        self._flips.set_random_state(seed=(seed + 1) % 2**32)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augment one region.

        Args:
            image: float32 ``(D, H', W')`` context region (see :func:`context_size`).
            label: integer ``(D, H', W')`` labels on the same voxels.

        Returns:
            ``(image, label)``: float32 and uint8 ``(D, H, W)`` patches; label values are a subset of the input's.
        """
        if image.shape != label.shape or image.shape[0] != self.patch_size[0]:
            raise ValueError(
                f"image {image.shape} and label {label.shape} must both be (D={self.patch_size[0]}, H', W')"
            )
        data: dict[Hashable, torch.Tensor] = {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.from_numpy(label.astype(np.float32)),
        }
        spatial = self._affine if self._rng.random() < self.affine_prob else self._crop
        out = self._flips(spatial(data))
        patch = out["image"].as_tensor().numpy().astype(np.float32, copy=False)
        labels = np.rint(out["label"].as_tensor().numpy()).astype(np.uint8)
        return patch, labels
