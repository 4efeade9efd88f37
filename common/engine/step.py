"""One guarded optimisation step: no update from a non-finite loss or gradient, and bf16 failures retried in fp32.

oneDNN's bf16 convolutions on some CPUs (seen on an AMD EPYC with AVX-512 BF16, torch 2.13) now and then return
NaN for a batch that the same kernels, run again on the same weights and input, compute finitely: a known class of
bugs (uninitialised tail/padding memory for channel counts that are not multiples of the kernel's block). Skipping
such a step silently costs training (whole local rounds were lost in ``bench/partial_labels.py``), so a step that is
not finite under bf16 autocast is computed once more in fp32 before it is given up. A failed attempt also must not
leave traces: BatchNorm's running statistics, which the forward pass updates, are put back as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedseg.common.nn.loss import DiceLoss

#: Builds the autocast context of one attempt: True = the configured (bf16) precision, False = plain fp32.
Precision = Callable[[bool], AbstractContextManager[object]]
#: An extra loss term from the logits and the batch (image, label, mask), computed in the attempt's precision.
Extra = Callable[[Tensor, tuple[Tensor, Tensor, Tensor]], Tensor]


@dataclass(frozen=True)
class StepResult:
    """What one :func:`guarded_step` did.

    Attributes:
        loss: the data loss (without the proximal term) of the applied update; NaN when none was applied.
        retried_fp32: the bf16 attempt was not finite and the step was computed again in fp32.
    """

    loss: float
    retried_fp32: bool = False

    @property
    def applied(self) -> bool:
        """An update was applied (the loss is finite)."""
        return self.loss == self.loss


def guarded_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: DiceLoss,
    batch: tuple[Tensor, Tensor, Tensor],
    precision: Precision,
    low_precision: bool,
    penalty: Callable[[], Tensor] | None = None,
    extra: Extra | None = None,
) -> StepResult:
    """Forward, backward and update on ``batch`` (image, label, mask) unless the result is not finite.

    ``precision(True)`` is the configured autocast context, ``precision(False)`` fp32; when ``low_precision`` (the
    configured context runs bf16) a non-finite first attempt is retried in fp32. ``penalty`` (FedProx) is added
    to the objective, and so is ``extra`` (e.g. pseudo-label distillation); the returned loss excludes both.
    """
    terms = (penalty, extra)
    loss = _attempt(model, optimizer, loss_fn, batch, precision(True), terms)
    retried = False
    if loss is None and low_precision:
        retried = True
        loss = _attempt(model, optimizer, loss_fn, batch, precision(False), terms)
    if loss is None:
        return StepResult(float("nan"), retried)
    optimizer.step()
    return StepResult(loss, retried)


def _attempt(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: DiceLoss,
    batch: tuple[Tensor, Tensor, Tensor],
    context: AbstractContextManager[object],
    terms: tuple[Callable[[], Tensor] | None, Extra | None],
) -> float | None:
    """Gradients of one forward/backward in ``context``; None (gradients cleared, buffers restored) if not finite."""
    penalty, extra = terms
    image, label, mask = batch
    optimizer.zero_grad(set_to_none=True)
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    with context:
        logits = model(image)
        added = extra(logits, batch) if extra is not None else None
    loss = loss_fn(logits.float(), label, mask)
    objective = loss + added if added is not None else loss
    objective = objective + penalty() if penalty is not None else objective
    finite = bool(torch.isfinite(objective.detach()))
    if finite:
        objective.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    if finite:
        return float(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    _restore(model, saved)
    return None


def _restore(model: nn.Module, saved: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(saved[name])
