"""Membership inference: AUC, bootstrap interval and TPR at FPR on hand-computed score vectors; calibrated scores."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.common.eval.membership import (
    attack_report,
    auc_interval,
    bootstrap_aucs,
    calibrated_scores,
    loss_scores,
    roc_auc,
    tpr_at_fpr,
)


def test_perfectly_separated_scores_give_auc_one_and_a_point_interval() -> None:
    assert roc_auc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == 1.0
    assert auc_interval([3.0, 4.0, 5.0], [0.0, 1.0, 2.0], resamples=200) == (1.0, 1.0)


def test_reversed_scores_give_auc_zero() -> None:
    assert roc_auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert auc_interval([0.0, 1.0], [2.0, 3.0], resamples=200) == (0.0, 0.0)


def test_tied_scores_give_one_half() -> None:
    assert roc_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5


def test_auc_counts_ordered_pairs_and_ties_as_half() -> None:
    # pairs (member, non-member): (3,2) yes, (3,0) yes, (1,2) no, (1,0) yes -> 3/4
    assert roc_auc([3.0, 1.0], [2.0, 0.0]) == pytest.approx(0.75)
    # (2,2) tie counts 1/2, (2,1) yes, (0,2) no, (0,1) no -> 1.5/4
    assert roc_auc([2.0, 0.0], [2.0, 1.0]) == pytest.approx(0.375)


def test_auc_refuses_an_empty_group_or_a_non_finite_score() -> None:
    with pytest.raises(ValueError, match="members and non-members"):
        roc_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([np.nan], [1.0])


def test_bootstrap_resamples_each_group_with_replacement() -> None:
    # the member 1 is always drawn; the non-members {0, 2} give AUC 1 (both 0), 1/2 (one each) or 0 (both 2)
    # with probabilities 1/4, 1/2, 1/4
    aucs = bootstrap_aucs([1.0], [0.0, 2.0], resamples=4000, seed=0)
    assert set(np.unique(aucs)) == {0.0, 0.5, 1.0}
    assert np.mean(aucs == 1.0) == pytest.approx(0.25, abs=0.03)
    assert np.mean(aucs == 0.5) == pytest.approx(0.5, abs=0.03)
    assert auc_interval([1.0], [0.0, 2.0], resamples=4000) == (0.0, 1.0)


def test_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(5)
    members, others = rng.normal(0.5, 1, 30), rng.normal(0, 1, 30)
    assert auc_interval(members, others, seed=3, resamples=300) == auc_interval(members, others, seed=3, resamples=300)
    assert auc_interval(members, others, seed=3, resamples=300) != auc_interval(members, others, seed=4, resamples=300)


def test_the_interval_narrows_with_the_sample_and_holds_the_auc() -> None:
    rng = np.random.default_rng(1)
    small = (rng.normal(1, 1, 12), rng.normal(0, 1, 12))
    large = (rng.normal(1, 1, 300), rng.normal(0, 1, 300))
    low_s, high_s = auc_interval(*small, resamples=500)
    low_l, high_l = auc_interval(*large, resamples=500)
    assert high_l - low_l < (high_s - low_s) / 2
    assert low_l < roc_auc(*large) < high_l
    # two normals one standard deviation apart: AUC = Phi(1 / sqrt 2) = 0.760
    assert low_l < 0.760 < high_l


def test_tpr_at_fpr_lets_at_most_the_allowed_non_members_through() -> None:
    others = np.arange(20.0)  # 0 .. 19; FPR 0.1 allows 2 of them (18 and 19): members must beat 17
    assert tpr_at_fpr([25.0, 18.5, 17.5, 5.0], others, 0.1) == 0.75
    assert tpr_at_fpr([25.0, 18.5, 17.0, 5.0], others, 0.1) == 0.5  # a tie with the threshold is not a member
    assert tpr_at_fpr([25.0, 18.5, 17.5, 5.0], others, 0.05) == 0.5  # 1 allowed (19): beat 18


def test_tpr_at_fpr_needs_enough_non_members() -> None:
    assert tpr_at_fpr([5.0], np.arange(20.0), 0.04) is None  # 0.04 x 20 < 1: not measurable
    assert tpr_at_fpr([5.0], np.arange(25.0), 0.04) == 0.0  # one allowed (24): 5 does not beat 23


def test_loss_scores_rank_low_losses_as_members() -> None:
    np.testing.assert_array_equal(loss_scores([0.1, 0.4]), [-0.1, -0.4])
    assert roc_auc(loss_scores([0.1, 0.2]), loss_scores([0.3, 0.4])) == 1.0


def test_calibrated_scores_subtract_the_target_loss_from_the_reference_mean() -> None:
    np.testing.assert_allclose(calibrated_scores([0.1, 0.5], [0.3, 0.4]), [0.2, -0.1])
    np.testing.assert_allclose(calibrated_scores([0.1, 0.5], [[0.2, 0.4], [0.4, 0.6]]), [0.2, 0.0])
    with pytest.raises(ValueError, match="reference losses"):
        calibrated_scores([0.1, 0.5], [0.3, 0.4, 0.5])


def test_calibration_removes_case_difficulty() -> None:
    # difficulty (every model's loss): members 0.8, 0.1; non-members 0.9, 0.2. Training lowers a member's loss 0.05.
    difficulty_m, difficulty_n = np.array([0.8, 0.1]), np.array([0.9, 0.2])
    target_m, target_n = difficulty_m - 0.05, difficulty_n
    # -loss: (-0.75 > -0.9) yes, (-0.75 > -0.2) no, (-0.05 > -0.9) yes, (-0.05 > -0.2) yes -> 3/4
    assert roc_auc(loss_scores(target_m), loss_scores(target_n)) == pytest.approx(0.75)
    # calibrated: members 0.05, 0.05; non-members 0, 0 -> 1
    assert roc_auc(calibrated_scores(target_m, difficulty_m), calibrated_scores(target_n, difficulty_n)) == 1.0


def test_attack_report_gathers_the_numbers() -> None:
    report = attack_report([3.0, 4.0, 5.0], [0.0, 1.0, 2.0], fpr=0.5, resamples=100)
    assert (report.auc, report.ci, report.members, report.non_members) == (1.0, (1.0, 1.0), 3, 3)
    assert report.tpr == 1.0  # FPR 0.5 of 3 allows 1 non-member (2): every member beats 1
