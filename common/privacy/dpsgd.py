"""Patient-level DP-SGD with Opacus: per-case gradients, clipped, summed and noised every step.

Each step Poisson-samples cases (:class:`~fedseg.common.privacy.sampling.PoissonCases`, rate q) and takes one patch
per sampled case, so a case, the patient, is what one step's clipping bounds. Opacus's
:class:`~opacus.GradSampleModule` (hook mode) computes every case's gradient of its own loss and
:class:`~opacus.optimizers.DPOptimizer` clips each to ``max_grad_norm``, adds Gaussian noise of standard deviation
``noise_multiplier × max_grad_norm`` (its ``secure_mode``, against floating-point attacks) and divides by the
expected batch q × cases, then AdamW steps. A step that sampled no case is a step of noise alone.

The loss is the mean over the step's cases of each case's own loss: a Dice mean over the whole batch would tie one
case's gradient to the others' (``batch_dice`` then scores each case alone). The noise generator is seeded from the
operating system's entropy: the round's seed comes from the server, which could otherwise replay the noise. FedProx's
proximal term depends on the weights only, so its gradient is added after the noise. bf16 autocast is not used:
training runs in float32 (the per-case norms that decide the clipping must not be rounded).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.data.sampling import PatchSampler
from fedseg.common.engine.config import TrainConfig, lr_factor
from fedseg.common.engine.device import autocast_active, seed_everything
from fedseg.common.engine.train import ProximalTerm, TimeLimit, TrainReport, make_optimizer
from fedseg.common.nn.loss import DiceLoss
from fedseg.common.privacy.sampling import PoissonCases

log = logging.getLogger(__name__)

#: (step, total, loss, patches/s), as :func:`fedseg.common.engine.train.train_model` reports progress.
OnStep = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class DPSettings:
    """One DP-SGD run's mechanism: noise multiplier σ, clip norm C and the Poisson rate q of every step."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float


def unsupported(model: nn.Module, cfg: TrainConfig) -> str | None:
    """Why DP-SGD cannot train ``model`` with ``cfg`` (one line), or None when it can."""
    errors = ModuleValidator.validate(model, strict=False)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return "DP-SGD cannot train model.norm = batch (per-case gradients cannot pass BatchNorm); use model.norm=group"
    if errors:
        return f"DP-SGD cannot train this model: {errors[0]}"
    if cfg.pseudo_weight > 0:
        return "DP-SGD does not combine with train.pseudo_weight > 0 (its teacher term is not clipped per case)"
    return None


def train_private(
    model: nn.Module,
    cases: Sequence[PreparedCase],
    cfg: TrainConfig,
    dp: DPSettings,
    device: torch.device | str,
    on_step: OnStep | None = None,
    time_limit: float | None = None,
    rng: np.random.Generator | None = None,
) -> TrainReport:
    """Train ``model`` in place with patient-level DP-SGD for ``cfg.total_steps`` steps.

    Args:
        model: a model without BatchNorm (:func:`unsupported` says why not); its weights are the start.
        cases: the site's prepared, labelled cases: the units of privacy.
        cfg: budget and hyper-parameters (``cfg.seed``: patch positions and augmentation only).
        dp: σ, C and q (q = expected batch / cases, what the accountant is told).
        device: where to train.
        on_step: called after every step with (step, total, loss, patches/s).
        time_limit: seconds the loop must end by (as in ``train_model``; every step taken counts for ε).
        rng: the Poisson draws (default: the operating system's entropy; tests pass a seeded one).

    Returns:
        The :class:`TrainReport`; ``steps`` is what the accountant must be told, ``samples`` the cases drawn.

    Raises:
        ValueError: the model or config cannot be trained under DP (:func:`unsupported`).
    """
    reason = unsupported(model, cfg)
    if reason is not None:
        raise ValueError(reason)
    device = torch.device(device)
    if autocast_active(device, cfg.amp, cfg.cpu_bf16):
        log.info("DP-SGD trains in float32: bf16 would round the per-case gradient norms the clipping is decided by")
    seed_everything(cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # missing from stubs
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        return _loop(wrapped, cases, cfg, dp, device, on_step, TimeLimit(time_limit), rng)
    finally:
        wrapped.remove_hooks()
        for param in model.parameters():
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(param, attr):
                    delattr(param, attr)
            param.grad = None


def _loop(
    wrapped: GradSampleModule,
    cases: Sequence[PreparedCase],
    cfg: TrainConfig,
    dp: DPSettings,
    device: torch.device,
    on_step: OnStep | None,
    limit: TimeLimit,
    rng: np.random.Generator | None,
) -> TrainReport:
    """The step loop of :func:`train_private`."""
    model: nn.Module = wrapped._module
    expected = max(1, round(dp.sample_rate * len(cases)))
    optimizer = _dp_optimizer(model, cfg, dp, expected, device)
    prox = ProximalTerm(model, cfg.prox_mu) if cfg.prox_mu > 0 else None
    loss_fn = DiceLoss(ce_weight=cfg.ce_weight, partial=cfg.partial_loss, exclusion_weight=cfg.exclusion_weight)
    patches = PatchSampler(cases, cfg.patch_size, 1, cfg.foreground_prob, cfg.augment, cfg.seed, cfg.affine_prob)
    draws = PoissonCases(len(cases), dp.sample_rate, rng)
    report = TrainReport(mean_loss=float("nan"), samples=0, steps=0, seconds=0.0)
    start = time.perf_counter()
    wrapped.train()
    limit.mark()
    total = cfg.total_steps
    shown = 0.0
    for step in range(1, total + 1):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step - 1, total, cfg.lr_schedule, cfg.warmup_steps)
        chosen = draws.draw()
        batch = _batch(patches, cases, chosen, device, cfg.channels_last) if chosen else None
        loss = _step(wrapped, optimizer, loss_fn, batch, prox)
        if batch is not None and not math.isfinite(loss):
            report.skipped_steps += 1
            log.warning("DP step %d: non-finite loss or gradients; update skipped", step)
        report.loss_history.append(loss)
        report.samples += len(chosen)
        report.steps = step
        shown = loss if math.isfinite(loss) else shown  # a step without a case shows the last loss there was
        if on_step is not None:
            on_step(step, total, shown, report.samples / max(time.perf_counter() - start, 1e-9))
        limit.lap()
        if step < total and limit.exhausted():
            report.time_limited = True
            log.info("stopped after %d of %d DP steps: one more would pass the time limit", step, total)
            break
    report.seconds = time.perf_counter() - start
    finite = [x for x in report.loss_history if math.isfinite(x)]
    report.mean_loss = float(np.mean(finite)) if finite else float("nan")
    return report


def _dp_optimizer(
    model: nn.Module, cfg: TrainConfig, dp: DPSettings, expected: int, device: torch.device
) -> DPOptimizer:
    """AdamW wrapped by Opacus: clip per case, add secret noise, average over the expected batch."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return DPOptimizer(
        make_optimizer(model, cfg),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected,
        loss_reduction="mean",
        generator=generator,
        secure_mode=True,
    )


def _batch(
    patches: PatchSampler, cases: Sequence[PreparedCase], chosen: Sequence[int], device: torch.device, last: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """One patch of every chosen case: image (N, 1, D, H, W), label (N, D, H, W), class mask (N, C)."""
    pairs = [patches.sample_patch(i) for i in chosen]
    image = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None]).to(device)
    if last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)).to(device)
    mask = torch.tensor([cases[i].annotated for i in chosen], dtype=torch.bool, device=device)
    return image, label, mask


def per_case_loss(loss_fn: DiceLoss, logits: Tensor, label: Tensor, mask: Tensor) -> Tensor:
    """The mean over the batch of every case's own loss (each case's term depends on that case alone)."""
    terms = [loss_fn(logits[i : i + 1].float(), label[i : i + 1], mask[i : i + 1]) for i in range(logits.shape[0])]
    return torch.stack(terms).mean()


def _step(
    wrapped: GradSampleModule,
    optimizer: DPOptimizer,
    loss_fn: DiceLoss,
    batch: tuple[Tensor, Tensor, Tensor] | None,
    prox: ProximalTerm | None,
) -> float:
    """One DP-SGD update; the batch's mean loss (NaN for an empty step, and for a non-finite one: no update)."""
    optimizer.zero_grad(set_to_none=True)
    loss = float("nan")
    if batch is None:
        for param in optimizer.params:
            param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)
    else:
        image, label, mask = batch
        objective = per_case_loss(loss_fn, wrapped(image), label, mask)
        if not torch.isfinite(objective.detach()):
            optimizer.zero_grad(set_to_none=True)
            return loss
        with warnings.catch_warnings():
            # the first convolution's input needs no gradient; Opacus's hooks still see its output's, as they must
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            objective.backward()  # type: ignore[no-untyped-call]  # untyped in torch
        if not all(bool(torch.isfinite(g).all()) for g in optimizer.grad_samples):
            optimizer.zero_grad(set_to_none=True)
            return loss
        loss = float(objective.detach())
    if optimizer.pre_step():
        if prox is not None:
            _add_proximal_gradient(prox)
        optimizer.original_optimizer.step()
    return loss


def _add_proximal_gradient(prox: ProximalTerm) -> None:
    """Add FedProx's μ (w − w_ref) to every parameter's (already private) gradient."""
    with torch.no_grad():
        for param, ref in zip(prox.params, prox.refs, strict=True):
            if param.grad is not None:
                param.grad.add_(param - ref, alpha=prox.mu)
