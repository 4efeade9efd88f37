"""Patch sampler and augmentation: shapes, padding, oversampling, seeding, label validity, alignment."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from fedseg.common.data.augment import PatchAugmenter, context_size
from fedseg.common.data.preprocess import Grid, PreparedCase, SourceGeometry
from fedseg.common.data.sampling import PatchSampler, crop_padded
from fedseg.common.errors import DataError

ALL = (True, True, True, True, True)


def make_case(
    image: np.ndarray, label: np.ndarray | None, annotated: tuple[bool, ...] = ALL, name: str = "c"
) -> PreparedCase:
    grid = Grid(image.shape, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # type: ignore[arg-type]
    return PreparedCase(name, image.astype(np.float32), label, annotated, SourceGeometry(grid, grid))


def organ_case(size: int = 48, seed: int = 0) -> PreparedCase:
    """A large 'liver' box (class 4) and a 3³ 'pancreas' (class 1) in one corner; image = 100 × label + noise."""
    label = np.zeros((size, size, size), np.uint8)
    label[size // 2 :, size // 2 :, : size // 2] = 4
    label[4:7, 4:7, size - 7 : size - 4] = 1
    noise = np.random.default_rng(seed).normal(0, 1, label.shape)
    return make_case(100.0 * label + noise, label)


def pancreas_fraction(sampler: PatchSampler, batches: int) -> float:
    hits = [bool((b.label == 1).flatten(1).any(1).all()) for b in sampler.batches(batches)]
    return sum(hits) / len(hits)


def test_crop_padded_hand_computed() -> None:
    array = np.arange(64).reshape(4, 4, 4)
    out = crop_padded(array, (-1, 2, 3), (3, 3, 3), -1)
    expected = np.full((3, 3, 3), -1)
    expected[1:, :2, :1] = array[0:2, 2:4, 3:4]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(crop_padded(array, (5, 0, 0), (2, 2, 2), 7), np.full((2, 2, 2), 7))


def test_sampler_batch_shapes_and_types() -> None:
    partial = (True, True, False, False, True)
    cases = [organ_case(24), make_case(np.zeros((24, 24, 24)), np.zeros((24, 24, 24), np.uint8), partial, "p")]
    batch = PatchSampler(cases, (16, 16, 16), batch_size=3, foreground_prob=0.5, augment=False, seed=0).next_batch()
    assert batch.image.shape == (3, 1, 16, 16, 16) and batch.image.dtype == torch.float32
    assert batch.label.shape == (3, 16, 16, 16) and batch.label.dtype == torch.int64
    assert batch.class_mask.shape == (3, 5) and batch.class_mask.dtype == torch.bool
    for row in batch.class_mask.tolist():
        assert tuple(row) in (ALL, partial)


def test_sampler_pads_volume_smaller_than_patch() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (8, 10, 12))
    label = (image > 1).astype(np.uint8)
    sampler = PatchSampler([make_case(image, label)], (16, 16, 16), batch_size=1, augment=False, seed=0)
    batch = sampler.next_batch()
    patch, patch_label = batch.image[0, 0].numpy(), batch.label[0].numpy()
    # the volume is centred: offsets (16 - 8) // 2 = 4, (16 - 10) // 2 = 3, (16 - 12) // 2 = 2
    np.testing.assert_allclose(patch[4:12, 3:13, 2:14], image.astype(np.float32))
    np.testing.assert_array_equal(patch_label[4:12, 3:13, 2:14], label)
    pad = np.ones(patch.shape, bool)
    pad[4:12, 3:13, 2:14] = False
    assert np.all(patch[pad] == np.float32(image.min())) and np.all(patch_label[pad] == 0)


def test_foreground_oversampling_puts_pancreas_in_patches() -> None:
    cases = [organ_case(48)]
    fractions = {
        prob: pancreas_fraction(PatchSampler(cases, (16, 16, 16), 1, prob, augment=False, seed=1), 300)
        for prob in (0.0, 0.33, 1.0)
    }
    # uniform 16³ patches in a 48³ volume rarely touch a 3³ corner blob; with oversampling the pancreas is
    # picked as the centre class in half of the foreground draws (two classes present)
    assert fractions[0.0] < 0.1
    assert 0.1 < fractions[0.33] < 0.35
    assert fractions[1.0] >= 0.45
    assert fractions[0.0] < fractions[0.33] < fractions[1.0]


def test_foreground_centres_ignore_unannotated_classes() -> None:
    case = organ_case(32)
    only_liver = make_case(case.image, case.label, (True, False, False, False, True))
    sampler = PatchSampler([only_liver], (8, 8, 8), 1, foreground_prob=1.0, augment=False, seed=0)
    for batch in sampler.batches(30):
        assert (batch.label == 4).any()  # every patch centred on the liver, never on the pancreas


def test_augmentation_keeps_labels_valid_and_aligned() -> None:
    case = organ_case(48)
    sampler = PatchSampler([case], (16, 24, 24), batch_size=2, foreground_prob=0.5, augment=True, seed=3)
    for batch in sampler.batches(10):
        assert set(torch.unique(batch.label).tolist()) <= {0, 1, 4}
        for image, label in zip(batch.image[:, 0].numpy(), batch.label.numpy(), strict=True):
            for cls in (0, 4):  # image = 100 × label: inside each region the intensity must match the label
                core = ndimage.binary_erosion(label == cls, iterations=2)
                if core.any():
                    assert np.abs(image[core] - 100.0 * cls).max() < 5.0


def test_augmentation_changes_geometry() -> None:
    case = organ_case(48)
    plain = PatchSampler([case], (16, 24, 24), 1, foreground_prob=0.0, augment=False, seed=5)
    augmented = PatchSampler([case], (16, 24, 24), 1, foreground_prob=0.0, augment=True, seed=5)
    pairs = list(zip(plain.batches(10), augmented.batches(10), strict=True))
    # same positions (same seed), but the augmented patches are resampled: the noise pattern moves
    assert all(not torch.allclose(a.image, b.image) for a, b in pairs)


def test_sampler_same_seed_same_batches() -> None:
    cases = [organ_case(32, seed=0), organ_case(32, seed=1)]

    def draw(seed: int) -> list[torch.Tensor]:
        sampler = PatchSampler(cases, (16, 16, 16), 2, 0.5, augment=True, seed=seed)
        return [t for b in itertools.islice(sampler, 4) for t in b]

    first, again, other = draw(7), draw(7), draw(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_patch_augmenter_checks_shapes() -> None:
    augmenter = PatchAugmenter((8, 16, 16), seed=0)
    assert context_size((8, 16, 16)) == (8, 29, 29)  # ceil(1.8 * 16)
    image, label = augmenter(np.zeros((8, 29, 29), np.float32), np.ones((8, 29, 29), np.uint8))
    assert image.shape == label.shape == (8, 16, 16) and label.dtype == np.uint8
    with pytest.raises(ValueError, match="must both be"):
        augmenter(np.zeros((4, 29, 29), np.float32), np.zeros((4, 29, 29), np.uint8))


def test_sampler_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="no training cases"):
        PatchSampler([], (16, 16, 16))
    with pytest.raises(DataError, match="case unl has no label map"):
        PatchSampler([make_case(np.zeros((8, 8, 8)), None, name="unl")], (16, 16, 16))
    with pytest.raises(ValueError, match="foreground_prob in"):
        PatchSampler([organ_case(16)], (16, 16, 16), foreground_prob=1.5)


def test_affine_prob_zero_gives_plain_centre_crops_up_to_flips() -> None:
    rng = np.random.default_rng(0)
    region = rng.normal(size=(8, 29, 29)).astype(np.float32)
    labels = rng.integers(0, 5, size=(8, 29, 29)).astype(np.uint8)
    flips = (lambda a: a, lambda a: a[:, ::-1], lambda a: a[:, :, ::-1], lambda a: a[:, ::-1, ::-1])
    image_centre, label_centre = region[:, 6:22, 6:22], labels[:, 6:22, 6:22]  # (29 - 16) // 2 = 6
    augmenter = PatchAugmenter((8, 16, 16), seed=0, affine_prob=0.0)
    seen = set()
    for _ in range(12):
        image, label = augmenter(region, labels)
        matches = [i for i, flip in enumerate(flips) if np.array_equal(image, flip(image_centre))]
        assert len(matches) == 1, "expected an exact (possibly flipped) centre crop"
        assert np.array_equal(label, flips[matches[0]](label_centre))
        seen.add(matches[0])
    assert len(seen) > 1  # the flips still happen


def test_affine_prob_one_always_resamples_and_zero_to_one_mixes() -> None:
    rng = np.random.default_rng(1)
    region = rng.normal(size=(8, 29, 29)).astype(np.float32)
    labels = np.zeros((8, 29, 29), np.uint8)
    centre = region[:, 6:22, 6:22]

    def exact_crops(prob: float) -> int:
        augmenter = PatchAugmenter((8, 16, 16), seed=3, affine_prob=prob)
        patches = [augmenter(region, labels)[0] for _ in range(40)]
        flips = (centre, centre[:, ::-1], centre[:, :, ::-1], centre[:, ::-1, ::-1])
        return sum(any(np.array_equal(p, f) for f in flips) for p in patches)

    assert exact_crops(1.0) == 0
    assert exact_crops(0.0) == 40
    assert 5 <= exact_crops(0.5) <= 35
    with pytest.raises(ValueError, match="affine_prob"):
        PatchAugmenter((8, 16, 16), seed=0, affine_prob=1.5)
