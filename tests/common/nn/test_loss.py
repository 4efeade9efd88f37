"""DiceLoss: hand-computed values on 4-voxel tensors, empty classes, class masks and their gradients."""

from __future__ import annotations

import math

import pytest
import torch

from fedseg.common.nn.loss import DiceLoss

LN3 = math.log(3.0)


def four_voxel_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes, four voxels laid out as (B=1, C=2, D=1, H=2, W=2).

    Logits z0 = 0 and z1 = [ln 3, ln 3, -ln 3, 0], so softmax p1 = e^z1 / (1 + e^z1) = [3/4, 3/4, 1/4, 1/2]
    and p0 = 1 - p1 = [1/4, 1/4, 3/4, 1/2]. Target = [1, 1, 0, 0].
    """
    z1 = torch.tensor([LN3, LN3, -LN3, 0.0]).reshape(1, 1, 2, 2)
    logits = torch.stack([torch.zeros_like(z1), z1], dim=1)
    target = torch.tensor([1, 1, 0, 0]).reshape(1, 1, 2, 2)
    return logits, target


# Class 1: 2*sum(p1*t1) = 2*(3/4 + 3/4) = 3;   sum(p1) + sum(t1) = 9/4 + 2 = 17/4  -> d1 = 12/17
# Class 0: 2*sum(p0*t0) = 2*(3/4 + 1/2) = 5/2; sum(p0) + sum(t0) = 7/4 + 2 = 15/4  -> d0 = 2/3
D0, D1 = 2.0 / 3.0, 12.0 / 17.0
# CE = -mean(log p_target) = -(3 ln(3/4) + ln(1/2)) / 4
CE = -(3 * math.log(0.75) + math.log(0.5)) / 4


def test_loss_hand_computed_two_classes() -> None:
    logits, target = four_voxel_case()
    loss = DiceLoss()(logits, target)
    assert loss.item() == pytest.approx(1 - (D0 + D1) / 2, abs=1e-5)  # = 16/51


def test_loss_without_background_uses_foreground_only() -> None:
    logits, target = four_voxel_case()
    loss = DiceLoss(include_background=False)(logits, target)
    assert loss.item() == pytest.approx(1 - D1, abs=1e-5)  # = 5/17


def test_loss_dice_plus_ce_value() -> None:
    logits, target = four_voxel_case()
    loss = DiceLoss(ce_weight=0.5)(logits, target)
    assert pytest.approx(0.3890484, abs=1e-6) == CE
    assert loss.item() == pytest.approx(1 - (D0 + D1) / 2 + 0.5 * CE, abs=1e-5)


def test_loss_accepts_channel_dim_in_target() -> None:
    logits, target = four_voxel_case()
    loss_fn = DiceLoss(ce_weight=1.0)
    assert loss_fn(logits, target.unsqueeze(1)).item() == pytest.approx(loss_fn(logits, target).item())


def test_loss_perfect_prediction_is_near_zero() -> None:
    target = torch.randint(0, 3, (2, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    logits = 30.0 * torch.nn.functional.one_hot(target, 3).permute(0, 4, 1, 2, 3).float()
    assert DiceLoss()(logits, target).item() < 1e-6


def test_loss_class_absent_from_patch_and_prediction_scores_zero() -> None:
    logits2, target = four_voxel_case()
    # A third class, confidently absent (p2 ~ e^-100) and not in the target: d2 = s / (s + ~0) = 1, loss 0.
    # The released formula 2(sum pt + s) / (sum p + sum t + s) would give d2 = 2 here.
    logits3 = torch.cat([logits2, torch.full((1, 1, 1, 2, 2), -100.0)], dim=1)
    loss = DiceLoss()(logits3, target)
    assert loss.item() == pytest.approx(1 - (D0 + D1 + 1.0) / 3, abs=1e-5)


def test_loss_class_absent_from_patch_but_predicted_costs_one() -> None:
    target = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    logits = torch.zeros(1, 2, 1, 2, 2)  # p1 = 1/2 everywhere, class 1 absent: d1 = s / (2 + s) ~ 0
    loss = DiceLoss(include_background=False)(logits, target)
    assert loss.item() == pytest.approx(1.0, abs=1e-5)


def test_exclusion_masked_class_gets_zero_gradient() -> None:
    logits2, target = four_voxel_case()
    extra = torch.tensor([2.0, -1.0, 0.5, 3.0]).reshape(1, 1, 1, 2, 2)
    logits3 = torch.cat([logits2, extra], dim=1).requires_grad_(True)
    mask = torch.tensor([True, True, False])
    loss = DiceLoss(ce_weight=1.0, partial="exclusion")(logits3, target, class_mask=mask)
    loss.backward()
    assert logits3.grad is not None
    assert torch.isfinite(logits3.grad).all()
    assert torch.equal(logits3.grad[:, 2], torch.zeros_like(logits3.grad[:, 2]))
    assert logits3.grad[:, :2].abs().sum() > 0
    # Exclusion = the softmax renormalised over classes 0 and 1, i.e. exactly the two-class values above.
    assert loss.item() == pytest.approx(1 - (D0 + D1) / 2 + CE, abs=1e-5)


def test_loss_unmasked_class_does_get_gradient() -> None:
    logits2, target = four_voxel_case()
    logits3 = torch.cat([logits2, torch.zeros(1, 1, 1, 2, 2)], dim=1).requires_grad_(True)
    DiceLoss()(logits3, target).backward()
    assert logits3.grad is not None
    assert logits3.grad[:, 2].abs().sum() > 0


def test_loss_per_sample_mask_averages_included_pairs() -> None:
    logits2, target = four_voxel_case()
    sample0 = torch.cat([logits2, torch.full((1, 1, 1, 2, 2), 1.0)], dim=1)
    sample1 = torch.cat([logits2, torch.full((1, 1, 1, 2, 2), -2.0)], dim=1)
    logits = torch.cat([sample0, sample1]).requires_grad_(True)
    targets = torch.cat([target, target])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss_fn = DiceLoss(partial="exclusion")
    loss = loss_fn(logits, targets, class_mask=mask)
    loss.backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad[0, 2], torch.zeros(1, 2, 2))
    assert logits.grad[1, 2].abs().sum() > 0
    # Mean over the 2 + 3 included (sample, class) pairs, not a mean of per-sample means.
    part0 = loss_fn(sample0, target, class_mask=mask[0]).item()  # mean of 2 terms
    part1 = loss_fn(sample1, target).item()  # mean of 3 terms
    assert loss.item() == pytest.approx((2 * part0 + 3 * part1) / 5, abs=1e-6)


def test_loss_everything_masked_returns_zero_with_graph() -> None:
    logits = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    loss = DiceLoss(include_background=False)(logits, target, class_mask=torch.tensor([True, False, False]))
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and logits.grad.abs().sum() == 0


@pytest.mark.parametrize(
    ("target_shape", "message"),
    [((1, 2, 2), "does not match logits"), ((2, 1, 2, 2), "does not match logits"), ((1, 2, 1, 2, 2), "does not")],
)
def test_loss_shape_mismatch_raises(target_shape: tuple[int, ...], message: str) -> None:
    logits, _ = four_voxel_case()
    with pytest.raises(ValueError, match=message):
        DiceLoss()(logits, torch.zeros(target_shape, dtype=torch.long))


def test_loss_bad_inputs_raise() -> None:
    logits, target = four_voxel_case()
    with pytest.raises(TypeError, match="integer label tensor"):
        DiceLoss()(logits, target.float())
    with pytest.raises(ValueError, match=r"in \[0, 2\), got range \[0, 2\]"):
        DiceLoss()(logits, target * 2)
    with pytest.raises(ValueError, match=r"must be \(2,\) or \(1, 2\)"):
        DiceLoss()(logits, target, class_mask=torch.tensor([True, True, True]))
    with pytest.raises(TypeError, match="bool tensor"):
        DiceLoss()(logits, target, class_mask=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="keep background"):
        DiceLoss()(logits, target, class_mask=torch.tensor([False, True]))
    with pytest.raises(ValueError, match="sample 0 contains class 1"):
        DiceLoss()(logits, target, class_mask=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="smooth must be > 0"):
        DiceLoss(smooth=0.0)


def test_batch_dice_hand_computed() -> None:
    logits = torch.zeros(2, 2, 2)  # p = 0.5 for both classes everywhere
    target = torch.tensor([[1, 1], [0, 0]])
    # per sample: d[0] = (0, 2/3), d[1] = (2/3, 0) -> loss mean(1, 1/3, 1/3, 1) = 2/3
    assert float(DiceLoss()(logits, target)) == pytest.approx(2 / 3, abs=1e-4)
    # over the batch: each class has intersection 1 and p + t sums 4 -> d = 0.5
    assert float(DiceLoss(batch_dice=True)(logits, target)) == pytest.approx(0.5, abs=1e-4)


def test_batch_dice_counts_a_class_only_where_annotated() -> None:
    logits = torch.zeros(2, 2, 2)
    target = torch.tensor([[1, 1], [0, 0]])
    mask = torch.tensor([[True, True], [True, False]])  # sample 1 does not annotate class 1: its p1 becomes 0
    # class 0: 2 * (0 + 2) / ((1 + 0) + (2 + 2)) = 0.8; class 1 from sample 0 only: 2 * 1 / (1 + 2) = 2/3
    expected = ((1 - 0.8) + (1 - 2 / 3)) / 2
    assert float(DiceLoss(batch_dice=True)(logits, target, mask)) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("ce_weight", [0.0, 1.0])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_loss_without_masks_equals_monais(ce_weight: float, batch_dice: bool) -> None:
    from monai.losses import DiceCELoss as MonaiDiceCE
    from monai.losses import DiceLoss as MonaiDice

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, 8, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 1, 8, 8, 8))
    target[1][target[1] == 3] = 0  # class 3 absent from the second sample: the smoothing decides its term
    common = {"softmax": True, "to_onehot_y": True, "smooth_nr": 1e-5, "smooth_dr": 1e-5, "batch": batch_dice}
    reference = (
        MonaiDiceCE(**common, lambda_dice=1.0, lambda_ce=ce_weight) if ce_weight else MonaiDice(**common)  # type: ignore[arg-type]
    )
    ours = DiceLoss(smooth=1e-5, ce_weight=ce_weight, batch_dice=batch_dice)
    assert float(ours(logits, target)) == pytest.approx(float(reference(logits, target)), abs=1e-6)


def three_class_case() -> tuple[torch.Tensor, torch.Tensor]:
    """The four-voxel case plus a class 2 with logit 0 (= z0): p = e^z / (2 + e^z1).

    p1 = [3/5, 3/5, 1/7, 1/3], p0 = p2 = [1/5, 1/5, 3/7, 1/3]; target = [1, 1, 0, 0].
    """
    logits2, target = four_voxel_case()
    return torch.cat([logits2, torch.zeros(1, 1, 1, 2, 2)], dim=1), target


# Marginal with class 2 unannotated: p~0 = p0 + p2 = [2/5, 2/5, 6/7, 2/3], p~1 = p1.
# Class 1: 2 * (3/5 + 3/5) = 12/5;  sum(p1) + 2 = 176/105 + 2 = 386/105  -> d1 = 126/193
# Class 0: 2 * (6/7 + 2/3) = 64/21; sum(p~0) + 2 = 244/105 + 2 = 454/105 -> d0 = 160/227
M0, M1 = 160 / 227, 126 / 193
MARGINAL_CE = -(2 * math.log(3 / 5) + math.log(6 / 7) + math.log(2 / 3)) / 4
# Exclusion term: p2 = [1/5, 1/5, 3/7, 1/3], E = [1, 1, 0, 0]: 2 * (2/5) / (122/105 + 2) = 21/83
EXCL = 21 / 83
UNANNOTATED_2 = torch.tensor([True, True, False])


def test_marginal_loss_hand_computed() -> None:
    logits, target = three_class_case()
    loss = DiceLoss(ce_weight=1.0)(logits, target, class_mask=UNANNOTATED_2)
    assert loss.item() == pytest.approx(1 - (M0 + M1) / 2 + MARGINAL_CE, abs=1e-5)


def test_exclusion_mode_hand_computed_is_the_renormalised_two_class_loss() -> None:
    logits, target = three_class_case()
    loss = DiceLoss(ce_weight=1.0, partial="exclusion")(logits, target, class_mask=UNANNOTATED_2)
    assert loss.item() == pytest.approx(1 - (D0 + D1) / 2 + CE, abs=1e-5)


def test_naive_mode_ignores_the_mask() -> None:
    logits, target = three_class_case()
    naive = DiceLoss(partial="naive")(logits, target, class_mask=UNANNOTATED_2)
    assert naive.item() == pytest.approx(DiceLoss()(logits, target).item(), abs=1e-6)
    # Full softmax: d2 = s / (sum(p2) + s) ~ 0 since class 2 is absent but predicted: the naive loss is larger.
    assert naive.item() > DiceLoss()(logits, target, class_mask=UNANNOTATED_2).item() + 0.2


def test_exclusion_term_hand_computed() -> None:
    logits, target = three_class_case()
    base = DiceLoss()(logits, target, class_mask=UNANNOTATED_2).item()
    with_term = DiceLoss(exclusion_weight=0.5)(logits, target, class_mask=UNANNOTATED_2).item()
    assert with_term - base == pytest.approx(0.5 * EXCL, abs=1e-5)
    # Every class annotated: nothing to exclude.
    assert DiceLoss(exclusion_weight=0.5)(logits, target).item() == pytest.approx(DiceLoss()(logits, target).item())


def test_marginal_does_not_penalise_an_unannotated_organ_where_the_site_says_background() -> None:
    logits, target = three_class_case()
    swapped = logits.clone()
    swapped[0, 0, 0, 1, :], swapped[0, 2, 0, 1, :] = torch.tensor([5.0, -5.0]), torch.tensor([-5.0, 5.0])
    # Voxels 3 and 4 are labelled 0; moving their mass from background to class 2 changes nothing marginally.
    marginal = DiceLoss(ce_weight=1.0)
    a = marginal(logits.clone(), target, UNANNOTATED_2).item()
    b = marginal(swapped, target, UNANNOTATED_2).item()
    swapped2 = swapped.clone()
    swapped2[0, [0, 2], 0, 1, :] = swapped[0, [2, 0], 0, 1, :]
    assert marginal(swapped2, target, UNANNOTATED_2).item() == pytest.approx(b, abs=1e-6)
    assert a != pytest.approx(b)  # sanity: the logits did change the (annotated) scores


def _train_free_logits(partial: str, steps: int = 50) -> float:
    """Adam on free logits of a 3-class, 8-voxel volume whose voxels 4..7 are organ 2, unannotated by the site.

    Returns the full-softmax P(class 2) on those voxels after ``steps`` steps (it starts at 0.649).
    """
    torch.manual_seed(0)
    logits = torch.zeros(1, 3, 8)
    logits[0, 2, 4:] = math.log(0.649 / 0.351 * 2)  # p2 = 0.649 at start on the organ-2 voxels
    logits[0, 1, :2] = 2.0
    logits.requires_grad_(True)
    target = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]])  # the site labels organ 2 as background
    optimiser = torch.optim.Adam([logits], lr=0.05)
    loss_fn = DiceLoss(ce_weight=1.0, partial=partial)  # type: ignore[arg-type]
    for _ in range(steps):
        optimiser.zero_grad()
        loss_fn(logits, target, class_mask=UNANNOTATED_2).backward()
        optimiser.step()
    return float(torch.softmax(logits.detach(), dim=1)[0, 2, 4:].mean())


def test_marginal_keeps_an_unannotated_organ_that_exclusion_and_naive_erode() -> None:
    start = 0.649
    assert _train_free_logits("marginal") >= start - 1e-3
    assert _train_free_logits("exclusion") < start - 0.1
    assert _train_free_logits("naive") < start - 0.3


def test_bad_partial_mode_raises() -> None:
    with pytest.raises(ValueError, match="partial must be one of marginal, exclusion, naive"):
        DiceLoss(partial="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exclusion_weight must be >= 0"):
        DiceLoss(exclusion_weight=-1.0)
