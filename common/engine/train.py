"""Local training: a step-budgeted AdamW + Dice loop, usable centrally and by a federated client every round.

The loop is a plain function so a Flower client can call it once per round with the global weights already
loaded into ``model``; everything it needs comes in through :class:`TrainConfig` and the arguments.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from fedseg.common.console import console
from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.data.sampling import PatchSampler
from fedseg.common.engine.config import TrainConfig, lr_factor
from fedseg.common.engine.device import autocast_active, autocast_for, seed_everything
from fedseg.common.engine.step import Extra, guarded_step
from fedseg.common.engine.validation import validate
from fedseg.common.nn.loss import DiceLoss
from fedseg.common.nn.pseudo import folded_distillation

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    """What one :func:`train_model` call did.

    Attributes:
        mean_loss: mean training loss (Dice [+ CE], without the proximal term) over the finite steps.
        samples: patches seen (steps × batch size).
        steps: steps taken (skipped ones included).
        skipped_steps: steps whose loss or gradients were not finite: no update was applied.
        fp32_retries: steps not finite under bf16 autocast and computed again in fp32 (see
            :mod:`fedseg.common.engine.step`); those that were finite then count as normal steps.
        time_limited: the loop stopped before the budget because one more step would have ended past
            ``time_limit`` seconds.
        seconds: wall time of the loop, validation included.
        val_seconds: the part of ``seconds`` spent validating.
        dice: per-class Dice of the last validation (``validate`` keys), ``None`` if not validated.
        loss_history: training loss of every step.
        val_history: (step, ``validate`` result) for every validation run.
    """

    mean_loss: float
    samples: int
    steps: int
    seconds: float
    val_seconds: float = 0.0
    skipped_steps: int = 0
    fp32_retries: int = 0
    time_limited: bool = False
    dice: dict[str, float] | None = None
    loss_history: list[float] = field(default_factory=list)
    val_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        """Training throughput in patches per second (validation time excluded)."""
        train_seconds = self.seconds - self.val_seconds
        return self.samples / train_seconds if train_seconds > 0 else 0.0


class TimeLimit:
    """A time limit for a loop of similar, long items (training steps, cases scored): whether one more fits.

    ``seconds`` count from construction (None = no limit). Checking "has the limit passed?" after an item lets the
    last one run past the limit by a whole item; a site's ``max_seconds`` is a promise about when its reply leaves.
    So :meth:`exhausted` judges *before* an item whether it would end in time, by the longest item so far (the
    first, which pays for warm-up, is usually the longest: the guess errs on the early side). Call :meth:`mark` as
    the first item starts and :meth:`lap` as each item ends; the first item always runs (nothing to judge by).
    """

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = seconds
        self.clock = clock
        self.start = clock()
        self.longest = 0.0
        self._lap = self.start

    def mark(self) -> None:
        """An item starts now."""
        self._lap = self.clock()

    def lap(self) -> None:
        """An item ended now (the next one starts now)."""
        now = self.clock()
        self.longest = max(self.longest, now - self._lap)
        self._lap = now

    def exhausted(self) -> bool:
        """Whether one more item, as long as the longest so far, would end past the limit."""
        return self.seconds is not None and self.clock() - self.start + self.longest > self.seconds


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (β 0.9/0.999) with the configured learning rate and *decoupled* weight decay.

    The paper uses Adam with coupled L2. Coupled, the decay is part of the gradient that Adam normalises, so
    an output-head row that gets no gradient (a class the site does not annotate, under ``partial_loss =
    "exclusion"``) moves by ~lr per step towards 0; decoupled, it shrinks by the factor ``1 - lr * weight_decay``
    (1e-10 with the defaults), so silence is not read as "make this class smaller".
    """
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


class ProximalTerm:
    """FedProx penalty μ/2 · ‖w − w_ref‖² over the trainable parameters (buffers such as BN statistics excluded).

    Args:
        model: the model being trained.
        mu: the proximal weight μ (> 0).
        reference: reference weights by parameter name (e.g. the round's global model); defaults to a copy of
            ``model``'s parameters at construction time, which is what FedProx uses.

    Raises:
        ValueError: ``reference`` misses a parameter or has a different shape.
    """

    def __init__(self, model: nn.Module, mu: float, reference: Mapping[str, Tensor] | None = None) -> None:
        self.mu = mu
        self.params: list[Tensor] = []
        self.refs: list[Tensor] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            ref = param if reference is None else reference.get(name)
            if ref is None or tuple(ref.shape) != tuple(param.shape):
                raise ValueError(f"reference weights miss parameter {name!r} or its shape {tuple(param.shape)}")
            self.params.append(param)
            self.refs.append(ref.detach().to(device=param.device, dtype=param.dtype).clone())

    def __call__(self) -> Tensor:
        """The penalty as a scalar tensor attached to the parameters' graph."""
        total = torch.stack([(p - r).pow(2).sum() for p, r in zip(self.params, self.refs, strict=True)]).sum()
        return 0.5 * self.mu * total


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[speed]:.2f} patch/s"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def _to_device(
    batch: tuple[Tensor, Tensor, Tensor], device: torch.device, channels_last: bool
) -> tuple[Tensor, Tensor, Tensor]:
    image, label, mask = batch
    image = image.to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    return image, label.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def train_model(
    model: nn.Module,
    cases: Sequence[PreparedCase],
    cfg: TrainConfig,
    device: torch.device | str,
    reference_weights: Mapping[str, Tensor] | None = None,
    val_cases: Sequence[PreparedCase] | None = None,
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    schedule: tuple[int, int] | None = None,
    on_step: Callable[[int, int, float, float], None] | None = None,
    time_limit: float | None = None,
) -> TrainReport:
    """Train ``model`` in place for ``cfg.total_steps`` steps on random patches of ``cases``.

    Args:
        model: the network; its current weights are the starting point (moved to ``device``).
        cases: prepared training cases with labels.
        cfg: budget and hyper-parameters; ``cfg.seed`` fixes sampling and augmentation.
        device: "cpu", "cuda", or a torch device.
        reference_weights: FedProx reference (parameter name -> tensor); defaults to the starting weights.
            Only used when ``cfg.prox_mu > 0``.
        val_cases: when given, whole-volume validation runs every ``cfg.val_every`` epochs and at the end.
        progress: show a rich progress bar with loss and speed.
        optimizer: an optimiser over ``model``'s parameters to continue (keeps Adam state across calls);
            a fresh :func:`make_optimizer` one when ``None``.
        schedule: ``(steps already taken, total steps)`` of a learning-rate schedule that spans several calls
            (``fed-eval train`` calls once per epoch); defaults to ``(0, cfg.total_steps)``.
        on_step: called after every step with (step, total, loss, patches/s).
        time_limit: seconds from the call (set-up included) the loop must end by (what is left of a site's
            ``max_seconds``): it stops before a step that, as long as the longest step so far, would end past it
            (:class:`TimeLimit`; the first step always runs). None = run the
            whole budget.

    Returns:
        A :class:`TrainReport`.

    Raises:
        DataError: no cases, or a case without a label (from :class:`PatchSampler`).
    """
    limit = TimeLimit(time_limit)
    device = torch.device(device)
    seed_everything(cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # missing from stubs
    optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg)
    loss_fn = DiceLoss(
        ce_weight=cfg.ce_weight,
        batch_dice=cfg.batch_dice,
        partial=cfg.partial_loss,
        exclusion_weight=cfg.exclusion_weight,
    )
    prox = ProximalTerm(model, cfg.prox_mu, reference_weights) if cfg.prox_mu > 0 else None
    low = autocast_active(device, cfg.amp, cfg.cpu_bf16)
    extra = _pseudo_labels(model, cases, cfg.pseudo_weight)

    def precision(configured: bool) -> AbstractContextManager[object]:
        return autocast_for(device, cfg.amp, cfg.cpu_bf16) if configured else nullcontext()

    sampler = PatchSampler(
        cases, cfg.patch_size, cfg.batch_size, cfg.foreground_prob, cfg.augment, cfg.seed, cfg.affine_prob
    )
    val_steps = cfg.val_every * cfg.steps_per_epoch
    total = cfg.total_steps
    done, horizon = schedule if schedule is not None else (0, total)
    report = TrainReport(mean_loss=float("nan"), samples=0, steps=0, seconds=0.0)
    start = time.perf_counter()
    model.train()
    limit.mark()
    with _progress(progress) as bar:
        task = bar.add_task("train", total=total, loss=float("nan"), speed=0.0)
        for step, batch in enumerate(sampler, start=1):
            image, label, mask = _to_device(batch, device, cfg.channels_last)
            _set_lr(optimizer, cfg.lr * lr_factor(done + step - 1, horizon, cfg.lr_schedule, cfg.warmup_steps))
            result = guarded_step(model, optimizer, loss_fn, (image, label, mask), precision, low, prox, extra)
            loss = result.loss
            report.fp32_retries += result.retried_fp32
            if not result.applied:
                report.skipped_steps += 1
                log.warning("step %d: non-finite loss or gradients; update skipped", step)
            elif result.retried_fp32:
                log.info("step %d: not finite in bf16, computed in fp32", step)
            report.loss_history.append(loss)
            report.samples += image.shape[0]
            report.steps = step
            speed = report.samples / (time.perf_counter() - start - report.val_seconds)
            bar.update(task, advance=1, loss=loss, speed=speed)
            if on_step is not None:
                on_step(step, total, loss, speed)
            if val_cases and (step % val_steps == 0 or step == total):
                val_start = time.perf_counter()
                report.dice = validate(model, val_cases, cfg.patch_size, device, cpu_bf16=cfg.cpu_bf16)
                report.val_seconds += time.perf_counter() - val_start
                report.val_history.append((step, report.dice))
                log.info("step %d: validation %s", step, _format_dice(report.dice))
                model.train()
            limit.lap()
            if step >= total:
                break
            if limit.exhausted():
                report.time_limited = True
                log.info("stopped after %d of %d steps: one more would pass the %g s limit", step, total, time_limit)
                break
    report.seconds = time.perf_counter() - start
    finite = [x for x in report.loss_history if math.isfinite(x)]
    report.mean_loss = float(np.mean(finite)) if finite else float("nan")
    return report


def _pseudo_labels(model: nn.Module, cases: Sequence[PreparedCase], weight: float) -> Extra | None:
    """The pseudo-label term (:mod:`fedseg.common.nn.pseudo`) with a frozen copy of ``model`` as it is now as the
    teacher, or None when ``weight`` is 0 or every case annotates every class."""
    if weight <= 0 or all(all(case.annotated) for case in cases):
        return None
    teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def term(logits: Tensor, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        image, label, mask = batch
        with torch.no_grad():
            target_logits: Tensor = teacher(image)
        scaled: Tensor = folded_distillation(logits, target_logits, label, mask) * weight
        return scaled

    return term


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _format_dice(dice: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in dice.items())
