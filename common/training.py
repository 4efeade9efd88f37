"""Local training: a step-budgeted Adam + Dice loop, usable centrally and by a federated client every round.

The loop is a plain function so a Flower client can call it once per round with the global weights already
loaded into ``model``; everything it needs comes in through :class:`TrainConfig` and the arguments.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from fedseg.common.errors import ConfigError
from fedseg.common.inference import SIDE_MULTIPLE, autocast_for
from fedseg.common.logs import console
from fedseg.common.loss import DiceLoss
from fedseg.common.preprocess import PreparedCase
from fedseg.common.sampling import PatchSampler
from fedseg.common.validation import validate

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Hyper-parameters of local training (paper recipe by default: Adam, lr 1e-4, weight decay 1e-6, batch 2).

    The budget is ``steps`` optimiser steps when set, otherwise ``epochs * steps_per_epoch``. An "epoch" is a
    fixed number of sampled patch batches, as in nnU-Net, not a pass over the cases.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=1, ge=1)
    steps_per_epoch: int = Field(default=250, ge=1)
    steps: int | None = Field(default=None, ge=1, description="overrides epochs * steps_per_epoch")
    batch_size: int = Field(default=2, ge=1)
    patch_size: tuple[int, int, int] = Field(default=(96, 160, 160), description="(D, H, W), multiples of 16")
    lr: float = Field(default=1e-4, gt=0)
    lr_schedule: Literal["constant", "poly"] = Field(
        default="constant",
        description="constant (the paper) or nnU-Net's poly decay (1 - t/T)^0.9 to zero over one train_model call "
        "(in a federation: within each round) unless the caller passes a schedule spanning calls",
    )
    warmup_steps: int = Field(default=0, ge=0, description="linear learning-rate warm-up from lr/warmup_steps")
    weight_decay: float = Field(default=1e-6, ge=0)
    ce_weight: float = Field(default=0.0, ge=0, description="cross-entropy weight added to the Dice loss")
    batch_dice: bool = Field(default=False, description="one Dice term per class over the batch (nnU-Net 3-D)")
    foreground_prob: float = Field(default=0.33, ge=0, le=1)
    augment: bool = True
    affine_prob: float = Field(
        default=1.0, ge=0, le=1, description="share of patches that get the paper's random affine (with augment)"
    )
    amp: bool = Field(default=True, description="bf16 autocast on CUDA; on the CPU only with cpu_bf16")
    cpu_bf16: bool = Field(
        default=False, description="bf16 autocast on the CPU as well: faster with AVX-512 BF16 / AMX, slower without"
    )
    channels_last: bool = Field(
        default=True, description="channels_last_3d memory format: much faster 3-D convolutions on CPU and CUDA"
    )
    seed: int = 0
    val_every: int = Field(default=1, ge=1, description="validate every this many epochs (when val cases given)")
    prox_mu: float = Field(default=0.0, ge=0, description="FedProx proximal weight μ; 0 disables it")

    @field_validator("patch_size")
    @classmethod
    def _multiple_of_16(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s <= 0 or s % SIDE_MULTIPLE for s in value):
            raise ValueError(f"every side must be a positive multiple of {SIDE_MULTIPLE}, got {value}")
        return value

    @property
    def total_steps(self) -> int:
        """The number of optimiser steps one :func:`train_model` call runs."""
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch


#: Exponent of the poly learning-rate decay (nnU-Net's value).
POLY_EXPONENT = 0.9


def lr_factor(step: int, total: int, schedule: Literal["constant", "poly"], warmup: int = 0) -> float:
    """Multiplier of the base learning rate for optimiser step ``step`` (0-based) of a ``total``-step schedule.

    ``poly`` decays as (1 - step/total)^0.9, reaching 0 after the last step; ``warmup`` > 0 first ramps the
    rate linearly over that many steps, (step + 1) / warmup. Steps past ``total`` keep the final factor.
    """
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "constant" or total <= 0:
        return warm
    return float(warm * (1.0 - min(step, total) / total) ** POLY_EXPONENT)


@dataclass
class TrainReport:
    """What one :func:`train_model` call did.

    Attributes:
        mean_loss: mean training loss (Dice [+ CE], without the proximal term) over all steps.
        samples: patches seen (steps × batch size).
        steps: optimiser steps taken.
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
    dice: dict[str, float] | None = None
    loss_history: list[float] = field(default_factory=list)
    val_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        """Training throughput in patches per second (validation time excluded)."""
        train_seconds = self.seconds - self.val_seconds
        return self.samples / train_seconds if train_seconds > 0 else 0.0


_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(value: str) -> str:
    """``value`` if it names a device fedseg can use (``auto``, ``cpu``, ``cuda``, ``cuda:N``); else ValueError.

    Only the spelling is checked; :func:`resolve_device` checks that the device exists on this machine.
    """
    if not _DEVICE_NAME.fullmatch(value):
        raise ValueError(f"must be cpu, cuda, cuda:N or auto, got {value!r}")
    return value


#: A config field naming a device: validated spelling, resolved with :func:`resolve_device` where it is used.
DeviceName = Annotated[str, AfterValidator(check_device_name)]


def resolve_device(name: str, setting: str = "--device") -> torch.device:
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` into a torch device that exists here.

    Args:
        name: the device name.
        setting: what the user set it with, for the error message (an option or a config key).

    Raises:
        ConfigError: the name is not a device, or CUDA was asked for but is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device_name(name)
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{setting} {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting} = {name} but CUDA is not available here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{setting} = {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so that a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (β 0.9/0.999) with the configured learning rate and weight decay, as in the paper."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


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

    Returns:
        A :class:`TrainReport`.

    Raises:
        DataError: no cases, or a case without a label (from :class:`PatchSampler`).
    """
    device = torch.device(device)
    seed_everything(cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # missing from stubs
    optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg)
    loss_fn = DiceLoss(ce_weight=cfg.ce_weight, batch_dice=cfg.batch_dice)
    prox = ProximalTerm(model, cfg.prox_mu, reference_weights) if cfg.prox_mu > 0 else None
    sampler = PatchSampler(
        cases, cfg.patch_size, cfg.batch_size, cfg.foreground_prob, cfg.augment, cfg.seed, cfg.affine_prob
    )
    val_steps = cfg.val_every * cfg.steps_per_epoch
    total = cfg.total_steps
    done, horizon = schedule if schedule is not None else (0, total)
    report = TrainReport(mean_loss=float("nan"), samples=0, steps=0, seconds=0.0)
    start = time.perf_counter()
    model.train()
    with _progress(progress) as bar:
        task = bar.add_task("train", total=total, loss=float("nan"), speed=0.0)
        for step, batch in enumerate(sampler, start=1):
            image, label, mask = _to_device(batch, device, cfg.channels_last)
            _set_lr(optimizer, cfg.lr * lr_factor(done + step - 1, horizon, cfg.lr_schedule, cfg.warmup_steps))
            loss = _train_step(model, optimizer, loss_fn, prox, image, label, mask, cfg)
            report.loss_history.append(loss)
            report.samples += image.shape[0]
            report.steps = step
            speed = report.samples / (time.perf_counter() - start - report.val_seconds)
            bar.update(task, advance=1, loss=loss, speed=speed)
            if val_cases and (step % val_steps == 0 or step == total):
                val_start = time.perf_counter()
                report.dice = validate(model, val_cases, cfg.patch_size, device)
                report.val_seconds += time.perf_counter() - val_start
                report.val_history.append((step, report.dice))
                log.info("step %d: validation %s", step, _format_dice(report.dice))
                model.train()
            if step >= total:
                break
    report.seconds = time.perf_counter() - start
    report.mean_loss = float(np.mean(report.loss_history))
    return report


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: DiceLoss,
    prox: ProximalTerm | None,
    image: Tensor,
    label: Tensor,
    mask: Tensor,
    cfg: TrainConfig,
) -> float:
    """One forward/backward/update; returns the data loss (without the proximal term)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(image.device, cfg.amp, cfg.cpu_bf16):
        logits = model(image)
    loss = loss_fn(logits.float(), label, mask)
    objective = loss + prox() if prox is not None else loss
    objective.backward()
    optimizer.step()
    return float(loss.detach())


def _format_dice(dice: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in dice.items())
