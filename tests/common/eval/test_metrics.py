"""Metrics: hand-computed boxes, analytic spheres on an anisotropic grid, empty-mask conventions, MONAI check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from scipy import ndimage

from fedseg.common.eval.metrics import (
    ClassMetrics,
    class_metrics,
    dice_per_class,
    label_metrics,
    overlap_metrics,
    summarize,
    surface_distances,
)

SPACING = (2.5, 0.8, 0.8)  # (z, y, x) mm
VOXEL_DIAGONAL = math.sqrt(2.5**2 + 0.8**2 + 0.8**2)  # 2.74 mm


def box(shape: tuple[int, int, int], z: slice, y: slice, x: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[z, y, x] = True
    return mask


def spheres(r1: float, r2: float) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric spheres (radii in mm) on a (30, 80, 80) grid with SPACING."""
    shape = (30, 80, 80)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, SPACING, strict=True)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt(zz**2 + yy**2 + xx**2)
    return radius <= r1, radius <= r2


def test_overlap_metrics_hand_computed_boxes() -> None:
    ref = box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))  # 4*4*4 = 64 voxels
    pred = box((10, 10, 10), slice(3, 7), slice(2, 6), slice(2, 8))  # 4*4*6 = 96 voxels
    # overlap z 3..5, y 2..5, x 2..5 = 3*4*4 = 48: Dice 96/160, precision 48/96, recall 48/64
    dice, precision, recall = overlap_metrics(pred, ref)
    assert (dice, precision, recall) == pytest.approx((0.6, 0.5, 0.75))


def test_surface_distances_single_voxels_use_zyx_spacing() -> None:
    pred = box((6, 6, 6), slice(2, 3), slice(3, 4), slice(3, 4))
    ref = box((6, 6, 6), slice(4, 5), slice(3, 4), slice(4, 5))
    # 2 slices in z (2 * 2.5 mm) and 1 voxel in x (0.8 mm): sqrt(25 + 0.64)
    expected = math.sqrt(25.64)
    m = class_metrics(pred, ref, SPACING)
    assert (m.dice, m.precision, m.recall) == (0.0, 0.0, 0.0)
    assert m.assd == pytest.approx(expected, rel=1e-6)
    assert m.hd95 == pytest.approx(expected, rel=1e-6)


def test_surface_distances_boxes_shifted_one_slice() -> None:
    ref = box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))
    pred = box((10, 10, 10), slice(3, 7), slice(2, 6), slice(2, 6))
    # Each 4^3 box has 56 surface voxels (all but its 2^3 core). pred -> ref: the far z-face (16 voxels) is one
    # slice (2.5 mm) from ref's top face; the 4 core voxels of pred's near face sit inside ref, 0.8 mm from its
    # side walls; the other 36 lie on ref's surface. ref -> pred is the mirror image.
    to_ref, to_pred = surface_distances(pred, ref, SPACING)
    for d in (to_ref, to_pred):
        assert d.size == 56
        assert np.count_nonzero(d == 0) == 36
        np.testing.assert_allclose(np.sort(d)[36:], [0.8] * 4 + [2.5] * 16, rtol=1e-6)
    m = class_metrics(pred, ref, SPACING)
    assert m.assd == pytest.approx(2 * (4 * 0.8 + 16 * 2.5) / 112, rel=1e-6)
    assert m.hd95 == pytest.approx(2.5, rel=1e-6)  # 95th percentile of 36 zeros, 4x0.8, 16x2.5


def test_concentric_spheres_match_analytic_values() -> None:
    r1, r2 = 20.0, 26.0
    inner, outer = spheres(r1, r2)
    voxel_volume = float(np.prod(SPACING))
    assert inner.sum() * voxel_volume == pytest.approx(4 / 3 * math.pi * r1**3, rel=0.01)
    m = class_metrics(inner, outer, SPACING)
    assert abs(m.assd - (r2 - r1)) < VOXEL_DIAGONAL
    assert abs(m.hd95 - (r2 - r1)) < VOXEL_DIAGONAL
    # Concentric spheres: |A ∩ B| = |A|, so Dice = 2 r1^3 / (r1^3 + r2^3)
    assert m.dice == pytest.approx(2 * r1**3 / (r1**3 + r2**3), abs=0.01)
    # pred = inner sphere, ref = outer: every predicted voxel is correct, the outer shell is missed
    assert m.precision == pytest.approx(1.0) and m.recall == pytest.approx(r1**3 / r2**3, abs=0.01)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecation inside its own code
def test_surface_distances_agree_with_monai() -> None:
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random((16, 24, 24)), 2) > 0.5
    b = ndimage.gaussian_filter(rng.random((16, 24, 24)), 2) > 0.5
    m = class_metrics(a, b, SPACING)
    ta, tb = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
    assd = compute_average_surface_distance(ta, tb, include_background=True, symmetric=True, spacing=SPACING)
    hd95 = compute_hausdorff_distance(ta, tb, include_background=True, percentile=95, spacing=SPACING)
    assert m.assd == pytest.approx(assd.item(), rel=1e-5)
    assert m.hd95 == pytest.approx(hd95.item(), rel=1e-5)


def test_empty_mask_conventions() -> None:
    empty = np.zeros((4, 4, 4), dtype=bool)
    full = box((4, 4, 4), slice(1, 3), slice(1, 3), slice(1, 3))
    both = class_metrics(empty, empty, SPACING)
    assert all(math.isnan(v) for v in (both.dice, both.precision, both.recall, both.assd, both.hd95))
    assert both.empty_state == "both_empty"
    ref_empty = class_metrics(full, empty, SPACING)  # false positive organ
    assert (ref_empty.dice, ref_empty.precision) == (0.0, 0.0)
    assert math.isnan(ref_empty.recall) and math.isnan(ref_empty.assd) and math.isnan(ref_empty.hd95)
    assert ref_empty.empty_state == "ref_empty"
    pred_empty = class_metrics(empty, full, SPACING)  # missed organ
    assert (pred_empty.dice, pred_empty.recall) == (0.0, 0.0)
    assert math.isnan(pred_empty.precision) and math.isnan(pred_empty.assd)
    assert pred_empty.empty_state == "pred_empty"
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(empty, full, SPACING)


def test_dice_per_class_hand_computed() -> None:
    ref = np.array([0, 0, 1, 1, 1, 2, 0, 0])
    pred = np.array([0, 1, 1, 1, 0, 0, 0, 0])
    # class 0: ref 4 voxels, pred 5, overlap 3 -> 6/9; class 1: 3 vs 3, overlap 2 -> 4/6;
    # class 2: ref 1, pred 0 -> 0; class 3: absent from both -> NaN
    dice = dice_per_class(pred, ref, n_classes=4)
    np.testing.assert_allclose(dice[:3], [6 / 9, 4 / 6, 0.0])
    assert math.isnan(dice[3])
    with pytest.raises(ValueError, match=r"ref labels must lie in \[0, 2\), got \[0, 2\]"):
        dice_per_class(pred, ref, n_classes=2)
    with pytest.raises(ValueError, match="does not match"):
        dice_per_class(pred[:4], ref, n_classes=4)


def test_label_metrics_uses_requested_classes_only() -> None:
    ref = np.zeros((8, 8, 8), dtype=np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[5:7, 5:7, 5:7] = 3
    pred = ref.copy()
    pred[5:7, 5:7, 5:7] = 0
    result = label_metrics(pred, ref, SPACING, classes=[1, 2, 3])
    assert sorted(result) == [1, 2, 3]
    assert result[1].dice == 1.0 and result[1].assd == 0.0 and result[1].hd95 == 0.0
    assert result[2].empty_state == "both_empty"
    assert result[3].empty_state == "pred_empty" and result[3].ref_voxels == 8


def test_summarize_excludes_nan_and_counts_empty_cases() -> None:
    nan = math.nan
    results = [
        ClassMetrics(0.5, 0.6, 0.4, 2.0, 4.0, ref_voxels=10, pred_voxels=8),
        ClassMetrics(0.7, 0.8, 0.6, 1.0, 3.0, ref_voxels=10, pred_voxels=9),
        ClassMetrics(nan, nan, nan, nan, nan, ref_voxels=0, pred_voxels=0),
        ClassMetrics(0.0, 0.0, nan, nan, nan, ref_voxels=0, pred_voxels=5),
    ]
    summary = summarize(results)
    # Dice over [0.5, 0.7, 0.0]: mean 0.4, deviations 0.1, 0.3, -0.4 -> sd sqrt(0.26 / 2)
    assert summary.metrics["dice"].mean == pytest.approx(0.4)
    assert summary.metrics["dice"].sd == pytest.approx(math.sqrt(0.13))
    assert summary.metrics["dice"].n == 3
    assert summary.metrics["recall"].n == 2 and summary.metrics["recall"].mean == pytest.approx(0.5)
    assert summary.metrics["assd"].mean == pytest.approx(1.5) and summary.metrics["assd"].n == 2
    assert (summary.n_cases, summary.n_both_empty, summary.n_ref_empty, summary.n_pred_empty) == (4, 1, 1, 0)
    single = summarize(results[:1]).metrics["dice"]
    assert single.mean == 0.5 and math.isnan(single.sd) and single.n == 1
