"""Pseudo-labels for the organs a site does not annotate: the received global model's own prediction as the target.

Under the marginal loss a voxel a site labels 0 means "background or an organ I do not label", and the loss only
asks that the folded probability (background + unannotated organs) be high. Early in a federation background holds
nearly all of it, so the sites that do not label an organ push the shared weights toward "that organ is background",
outvoting the one site that labels it (``bench/partial_labels.py``: the spleen, labelled at one site of three, stayed
at Dice 0.00). Here, on such voxels, the split *within* the folded classes follows the teacher (the global model the
round started from): cross-entropy of the student against the teacher's probabilities over {background} ∪ the
sample's unannotated classes, renormalised. Annotated organs get no pseudo-target: the site's labels say where they
are not.
"""

from __future__ import annotations

import torch
from torch import Tensor


def folded_distillation(logits: Tensor, teacher_logits: Tensor, target: Tensor, annotated: Tensor) -> Tensor:
    """Mean cross-entropy, over the voxels labelled 0 of samples that leave some class unannotated, of the student's
    softmax against the teacher's probabilities restricted to background and the unannotated classes.

    Args:
        logits: student logits ``(B, C, ...)``.
        teacher_logits: teacher logits, same shape (no gradient is taken through them).
        target: integer labels ``(B, ...)`` or ``(B, 1, ...)``.
        annotated: bool ``(B, C)``, False for the classes a sample's site does not annotate.

    Returns:
        A scalar; 0 (attached to the graph) when every sample annotates every class or no voxel is labelled 0.
    """
    batch, n_classes = logits.shape[:2]
    folded = ~annotated.to(torch.bool).expand(batch, n_classes).clone()
    folded[:, 0] = True
    partial = folded[:, 1:].any(dim=1)  # (B,)
    flat_target = target.reshape(batch, -1)
    voxels = (flat_target == 0) & partial[:, None]  # (B, N)
    log_p = torch.log_softmax(logits.float().reshape(batch, n_classes, -1), dim=1)
    if not bool(voxels.any()):
        return log_p.sum() * 0.0
    with torch.no_grad():
        q = torch.softmax(teacher_logits.float().reshape(batch, n_classes, -1), dim=1) * folded[:, :, None]
        t = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
    cross_entropy = -(t * log_p).sum(dim=1)  # (B, N)
    return (cross_entropy * voxels).sum() / voxels.sum()
