"""Soft multi-class Dice loss (Oktay et al. 2018) with symmetric smoothing, optional CE and partial labels.

Per sample ``b`` and class ``c`` the soft Dice is

    d[b, c] = (2 * sum(p * t) + s) / (sum(p) + sum(t) + s)

with ``p`` the softmax probability of class ``c``, ``t`` its one-hot target and ``s = smooth``. The smoothing is
symmetric (``s`` in numerator and denominator), so a class absent from both the patch and the prediction scores
``d = 1`` (loss 0). The released code adds ``2 s`` on top and scores such classes 2 instead; this module does
not copy that. The Dice loss is ``1 - mean(d)`` over the included ``(b, c)`` pairs.

With ``batch_dice`` (nnU-Net's choice for 3-D patches) the sums run over the whole batch instead, one term per
class, ``d[c] = (2 * sum_b sum(p * t) + s) / (sum_b (sum(p) + sum(t)) + s)``, counting only the samples that
annotate ``c``: a class missing from one patch then no longer gives that patch a loss of ~1 for any probability
it puts there.

Partially labelled sites (``class_mask``): a site that does not annotate, say, the liver labels liver voxels as
background, so its label 0 means "background or an organ this site does not annotate". ``partial`` picks how
the loss reads that:

* ``"marginal"`` (default; Shi et al., Medical Image Analysis 2021): the probabilities of the unannotated
  classes are folded into background before scoring, ``p~0 = p0 + sum_{c not annotated} p_c`` (computed as a
  logsumexp of log-probabilities). Dice and CE are scored on ``(p~0, p_annotated)``, so predicting an
  unannotated organ where the site says 0 costs nothing: the site never teaches "this is not liver".
  Unannotated channels do get gradient (through ``p~0``), their own Dice terms are left out of the mean.
* ``"exclusion"``: the unannotated logits are removed from the softmax (set to ``-inf``) and the rest is
  renormalised. Those channels get zero gradient, but background is still pushed up on the unannotated organ's
  voxels, which lowers that organ's probability under the full softmax.
* ``"naive"``: the mask is ignored and 0 is taken as true background (the wrong baseline, for benchmarks).

With ``exclusion_weight`` λ > 0 the *exclusion term* of the same paper is added: organs do not overlap, so a
voxel the site labels as one of its annotated organs is certainly none of the organs it does not annotate;
``λ * mean_{(b, c not annotated)} 2 * sum(p_c * E) / (sum(p_c) + sum(E) + s)`` with ``E`` the union of the
sample's foreground voxels and ``p`` the full softmax (no smoothing in the numerator, so it is 0 when there is
nothing to exclude).

Background must always be annotated, and a target voxel may not carry a class that its sample masks out.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PartialMode = Literal["marginal", "exclusion", "naive"]
PARTIAL_MODES: tuple[PartialMode, ...] = ("marginal", "exclusion", "naive")


class DiceLoss(nn.Module):
    """Soft Dice loss on logits, optionally plus cross-entropy, with per-sample class masks.

    Args:
        include_background: Keep class 0 in the Dice mean (the paper does). It always stays in the softmax.
        smooth: Symmetric smoothing ``s`` added to numerator and denominator of every Dice term.
        ce_weight: Weight of the cross-entropy term added to the Dice loss; ``0`` disables it.
        batch_dice: One Dice term per class over the whole batch instead of one per sample and class.
        partial: How unannotated classes are treated: ``"marginal"``, ``"exclusion"`` or ``"naive"``.
        exclusion_weight: Weight λ of the exclusion term; ``0`` disables it.

    Example:
        >>> loss = DiceLoss(ce_weight=1.0)
        >>> logits = torch.zeros(2, 5, 16, 16, 16, requires_grad=True)
        >>> target = torch.zeros(2, 16, 16, 16, dtype=torch.long)
        >>> loss(logits, target, class_mask=torch.tensor([True, True, False, True, True])).backward()
    """

    def __init__(
        self,
        include_background: bool = True,
        smooth: float = 1e-5,
        ce_weight: float = 0.0,
        batch_dice: bool = False,
        partial: PartialMode = "marginal",
        exclusion_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0 so that empty classes are defined, got {smooth}")
        if ce_weight < 0 or exclusion_weight < 0:
            raise ValueError(f"ce_weight and exclusion_weight must be >= 0, got {ce_weight}, {exclusion_weight}")
        if partial not in PARTIAL_MODES:
            raise ValueError(f"partial must be one of {', '.join(PARTIAL_MODES)}, got {partial!r}")
        self.include_background = include_background
        self.smooth = smooth
        self.ce_weight = ce_weight
        self.batch_dice = batch_dice
        self.partial = partial
        self.exclusion_weight = exclusion_weight

    def forward(self, logits: Tensor, target: Tensor, class_mask: Tensor | None = None) -> Tensor:
        """Compute the loss.

        Args:
            logits: Raw network output, shape ``(B, C, D, H, W)`` (any number of spatial dims works).
            target: Integer labels in ``[0, C)``, shape ``(B, D, H, W)`` or ``(B, 1, D, H, W)``.
            class_mask: Bool, ``(C,)`` or ``(B, C)``; ``False`` marks classes the sample's site does not
                annotate. ``None`` means every class is annotated.

        Returns:
            Scalar loss. It is 0 (still attached to the graph) when no term is left.

        Raises:
            ValueError: Mismatched shapes, labels outside ``[0, C)``, a mask that drops background, or a
                target voxel carrying a masked class.
            TypeError: ``target`` not an integer tensor or ``class_mask`` not bool.
        """
        target = _check_target(logits, target)
        batch, n_classes = logits.shape[:2]
        annotated = _expand_mask(class_mask, batch, n_classes, logits.device)
        flat_logits = logits.float().flatten(2)
        flat_target = target.flatten(1)
        counts = torch.zeros(batch, n_classes, device=logits.device).scatter_add_(
            1, flat_target, torch.ones_like(flat_target, dtype=torch.float32)
        )
        _check_no_masked_labels(counts, annotated)
        mask = torch.ones_like(annotated) if self.partial == "naive" else annotated
        log_probs = scoring_log_probs(flat_logits, mask, self.partial)
        probs = log_probs.exp()

        p_at_target = probs.gather(1, flat_target.unsqueeze(1)).squeeze(1)
        intersection = torch.zeros_like(counts).scatter_add_(1, flat_target, p_at_target)
        include = mask.clone()
        if not self.include_background:
            include[:, 0] = False
        denominator = probs.sum(dim=2) + counts
        if self.batch_dice:
            weights = include.to(intersection.dtype)  # a sample adds to class c only where it annotates c
            intersection, denominator = (intersection * weights).sum(0, True), (denominator * weights).sum(0, True)
            include = include.any(dim=0, keepdim=True)
        dice = (2.0 * intersection + self.smooth) / (denominator + self.smooth)
        loss = _masked_mean(1.0 - dice, include)
        if self.ce_weight > 0:
            loss = loss + self.ce_weight * F.nll_loss(log_probs, flat_target)
        if self.exclusion_weight > 0:
            loss = loss + self.exclusion_weight * exclusion_term(flat_logits, flat_target, annotated, self.smooth)
        return loss


def scoring_log_probs(flat_logits: Tensor, mask: Tensor, partial: PartialMode) -> Tensor:
    """Log-probabilities ``(B, C, N)`` the Dice and CE terms score; unannotated channels are ``-inf``.

    ``"marginal"`` folds the unannotated classes into channel 0 (a logsumexp of log-probabilities, stable);
    ``"exclusion"`` renormalises the softmax over the annotated classes; with an all-True mask both are the
    plain log-softmax.
    """
    spread = mask[..., None].expand_as(flat_logits)
    if partial == "exclusion":
        return torch.log_softmax(flat_logits.masked_fill(~spread, float("-inf")), dim=1)
    log_probs = torch.log_softmax(flat_logits, dim=1)
    if bool(mask.all()):
        return log_probs
    folded = ~spread.clone()
    folded[:, 0] = True
    background = torch.logsumexp(log_probs.masked_fill(~folded, float("-inf")), dim=1, keepdim=True)
    return torch.cat([background, log_probs[:, 1:].masked_fill(~spread[:, 1:], float("-inf"))], dim=1)


def exclusion_term(flat_logits: Tensor, flat_target: Tensor, annotated: Tensor, smooth: float) -> Tensor:
    """Mean soft overlap of each unannotated class's full-softmax probability with the sample's foreground.

    Args:
        flat_logits: ``(B, C, N)`` logits.
        flat_target: ``(B, N)`` labels.
        annotated: ``(B, C)`` bool, background True.
        smooth: added to the denominator only.

    Returns:
        ``mean over (b, c not annotated) of 2 sum(p_c E_b) / (sum(p_c) + sum(E_b) + smooth)``; 0 (with graph)
        when every class is annotated.
    """
    probs = torch.softmax(flat_logits, dim=1)
    foreground = (flat_target > 0).to(probs.dtype).unsqueeze(1)
    overlap = 2.0 * (probs * foreground).sum(dim=2) / (probs.sum(dim=2) + foreground.sum(dim=2) + smooth)
    return _masked_mean(overlap, ~annotated)


def _check_target(logits: Tensor, target: Tensor) -> Tensor:
    """Validate shapes and values; return the target as ``(B, D, H, W)`` int64."""
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target.squeeze(1)
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
            "expected (B, D, H, W) or (B, 1, D, H, W)"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer label tensor, got {target.dtype}")
    n_classes = logits.shape[1]
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= n_classes:
        raise ValueError(f"target labels must lie in [0, {n_classes}), got range [{low}, {high}]")
    return target.long()


def _expand_mask(class_mask: Tensor | None, batch: int, n_classes: int, device: torch.device) -> Tensor:
    """Turn ``None``, ``(C,)`` or ``(B, C)`` into a ``(B, C)`` bool mask on ``device``."""
    if class_mask is None:
        return torch.ones(batch, n_classes, dtype=torch.bool, device=device)
    if class_mask.dtype != torch.bool:
        raise TypeError(f"class_mask must be a bool tensor, got {class_mask.dtype}")
    if class_mask.shape not in ((n_classes,), (batch, n_classes)):
        raise ValueError(f"class_mask shape {tuple(class_mask.shape)} must be ({n_classes},) or ({batch}, {n_classes})")
    mask = class_mask.to(device).expand(batch, n_classes)
    if not bool(mask[:, 0].all()):
        raise ValueError("class_mask must keep background (class 0) annotated for every sample")
    return mask


def _check_no_masked_labels(counts: Tensor, mask: Tensor) -> None:
    """Raise if a sample's target uses a class its mask declares unannotated (its probability would be 0)."""
    bad = (counts > 0) & ~mask
    if bool(bad.any()):
        sample, cls = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"target of sample {sample} contains class {cls}, which class_mask marks as not annotated")


def _masked_mean(values: Tensor, include: Tensor) -> Tensor:
    """Mean of ``values`` over the ``True`` entries of ``include``; 0 (with gradient) if there are none."""
    weights = include.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)
