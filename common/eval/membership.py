"""Membership inference on a model's per-case losses: attack scores, ROC AUC with a bootstrap interval, TPR at low FPR.

The attacker holds the trained model and a pool of cases, some used in training (members) and some not; it scores
each case and the ROC AUC of those scores against the truth says how well membership can be told apart (0.5: not at
all). Two scores:

* the **loss threshold** attack (Yeom et al. 2018): score = −loss; a trained model fits its own cases better;
* the **calibrated** attack (difficulty calibration, Watson et al. 2022; the offline form of LiRA, Carlini et al.
  2022): score = reference loss − target loss, where the reference models were trained *without* the case (on
  other cases from the same distribution). A case that is hard for every model has a high loss whether or not it
  was trained on; subtracting the reference loss removes that difficulty and leaves what training on it changed.

The interval is a stratified percentile bootstrap (members and non-members resampled with replacement separately,
so every resample has both), seeded. TPR at a fixed low FPR is read at the threshold that lets at most
⌊FPR × non-members⌋ non-members through, and only where that is at least one (the sample allows the FPR).

The losses themselves come from whoever holds the model (``bench/privacy.py`` scores whole cases by sliding-window
inference); this module needs numbers only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from monai.metrics.rocauc import compute_roc_auc

Scores = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]


def loss_scores(losses: Scores) -> FloatArray:
    """The loss-threshold attack's scores (Yeom et al. 2018): −loss, higher meaning more likely a member."""
    return -np.asarray(losses, dtype=np.float64)


def calibrated_scores(target_losses: Scores, reference_losses: Scores) -> FloatArray:
    """Difficulty-calibrated scores (Watson et al. 2022): the reference models' mean loss minus the target's.

    Args:
        target_losses: the attacked model's loss on each case, shape (n,).
        reference_losses: the loss on each case of models trained without it, shape (n,) (one reference model)
            or (k, n) (k models, averaged).

    Raises:
        ValueError: the shapes do not match.
    """
    target = np.asarray(target_losses, dtype=np.float64)
    reference = np.asarray(reference_losses, dtype=np.float64)
    if reference.ndim == 2:
        reference = reference.mean(axis=0)
    if target.ndim != 1 or reference.shape != target.shape:
        raise ValueError(f"need (n,) target losses and (n,) or (k, n) reference losses, got {target.shape}, "
                         f"{np.shape(reference_losses)}")  # fmt: skip
    return reference - target


def roc_auc(member_scores: Scores, non_member_scores: Scores) -> float:
    """ROC AUC of telling members from non-members by score (MONAI's ``compute_roc_auc``; ties count half).

    Raises:
        ValueError: either group is empty or a score is not finite.
    """
    members = np.asarray(member_scores, dtype=np.float64)
    others = np.asarray(non_member_scores, dtype=np.float64)
    if not members.size or not others.size:
        raise ValueError(f"need members and non-members, got {members.size} and {others.size}")
    scores = np.concatenate([members, others])
    if not np.isfinite(scores).all():
        raise ValueError("membership scores must be finite")
    truth = torch.cat([torch.ones(members.size, dtype=torch.int64), torch.zeros(others.size, dtype=torch.int64)])
    auc = compute_roc_auc(torch.from_numpy(scores), truth)  # one class: MONAI's _calculate, a float
    assert isinstance(auc, float)
    return auc


def bootstrap_aucs(member_scores: Scores, non_member_scores: Scores, resamples: int, seed: int) -> FloatArray:
    """The AUCs of ``resamples`` stratified bootstrap resamples (numpy's seeded generator)."""
    members = np.asarray(member_scores, dtype=np.float64)
    others = np.asarray(non_member_scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for i in range(resamples):
        out[i] = roc_auc(rng.choice(members, members.size), rng.choice(others, others.size))
    return out


def auc_interval(
    member_scores: Scores, non_member_scores: Scores, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the AUC at ``level`` (e.g. 0.95: the 2.5th and 97.5th percentiles)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    aucs = bootstrap_aucs(member_scores, non_member_scores, resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return float(low), float(high)


def tpr_at_fpr(member_scores: Scores, non_member_scores: Scores, fpr: float) -> float | None:
    """The fraction of members scored above the threshold that lets at most ⌊``fpr`` × non-members⌋ non-members
    through (a tie with the threshold counts as a non-member); None when that is zero: too few non-members to
    measure at ``fpr``."""
    members = np.asarray(member_scores, dtype=np.float64)
    others = np.sort(np.asarray(non_member_scores, dtype=np.float64))[::-1]
    allowed = math.floor(fpr * others.size + 1e-9)
    if allowed < 1 or not members.size:
        return None
    threshold = others[allowed] if allowed < others.size else -np.inf
    return float(np.mean(members > threshold))


@dataclass(frozen=True)
class AttackReport:
    """One attack's result: AUC with its bootstrap interval, and TPR at ``fpr`` (None: the sample is too small)."""

    auc: float
    ci: tuple[float, float]
    tpr: float | None
    fpr: float
    members: int
    non_members: int


def attack_report(
    member_scores: Sequence[float] | FloatArray,
    non_member_scores: Sequence[float] | FloatArray,
    fpr: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
) -> AttackReport:
    """AUC, its 95 % bootstrap interval and TPR at ``fpr`` of one attack's scores."""
    return AttackReport(
        auc=roc_auc(member_scores, non_member_scores),
        ci=auc_interval(member_scores, non_member_scores, 0.95, resamples, seed),
        tpr=tpr_at_fpr(member_scores, non_member_scores, fpr),
        fpr=fpr,
        members=len(member_scores),
        non_members=len(non_member_scores),
    )
