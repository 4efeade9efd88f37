"""Training hyper-parameters (:class:`TrainConfig`) and the learning-rate schedule: the part of training the
wire contract and the server config need, without the training loop."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedseg.common.nn.loss import PartialMode
from fedseg.common.nn.model import SIZE_MULTIPLE


class TrainConfig(BaseModel):
    """Hyper-parameters of local training (paper recipe by default: lr 1e-4, weight decay 1e-6, batch 2).

    The optimiser is AdamW (decoupled weight decay): with Adam's coupled L2 a class a site does not annotate
    would see its output-head row shrink every step (its only "gradient" is the decay, which Adam normalises
    to a step of ~lr), and FedAvg would average that shrinkage in.

    The budget is ``steps`` optimiser steps when set, otherwise ``epochs * steps_per_epoch``. An "epoch" is a
    fixed number of sampled patch batches, as in nnU-Net, not a pass over the cases.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=1, ge=1, description="epochs of steps_per_epoch steps (when steps is not set)")
    steps_per_epoch: int = Field(default=250, ge=1, description="sampled patch batches per epoch (nnU-Net style)")
    steps: int | None = Field(default=None, ge=1, description="overrides epochs * steps_per_epoch")
    batch_size: int = Field(default=2, ge=1, description="patches per step (under DP-SGD: the expected batch)")
    patch_size: tuple[int, int, int] = Field(default=(96, 160, 160), description="(D, H, W), multiples of 16")
    lr: float = Field(default=1e-4, gt=0, description="AdamW learning rate")
    lr_schedule: Literal["constant", "poly"] = Field(
        default="constant",
        description="constant (the paper) or nnU-Net's poly decay (1 - t/T)^0.9 to zero over one train_model call "
        "(in a federation: within each round) unless the caller passes a schedule spanning calls",
    )
    warmup_steps: int = Field(default=0, ge=0, description="linear learning-rate warm-up from lr/warmup_steps")
    weight_decay: float = Field(default=1e-6, ge=0, description="AdamW weight decay")
    ce_weight: float = Field(default=0.0, ge=0, description="cross-entropy weight added to the Dice loss")
    batch_dice: bool = Field(default=False, description="one Dice term per class over the batch (nnU-Net 3-D)")
    partial_loss: PartialMode = Field(
        default="marginal",
        description="classes a site does not annotate: marginal (folded into background), exclusion (removed "
        "from the softmax) or naive (0 read as background)",
    )
    exclusion_weight: float = Field(
        default=0.0, ge=0, description="weight of the exclusion term (unannotated organs on annotated voxels)"
    )
    pseudo_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of the pseudo-label term for unannotated organs: on voxels a partial site labels 0, the "
        "model as the local training starts (the round's global model) sets the target among background and the "
        "unannotated organs (0: off)",
    )
    foreground_prob: float = Field(
        default=0.33, ge=0, le=1, description="share of patches centred on a labelled organ voxel (else anywhere)"
    )
    augment: bool = Field(default=True, description="the paper's random in-plane affine and flips of patches")
    affine_prob: float = Field(
        default=1.0, ge=0, le=1, description="share of patches that get the paper's random affine (with augment)"
    )
    amp: bool = Field(default=True, description="bf16 autocast on CUDA; on the CPU as cpu_bf16 says")
    cpu_bf16: Literal["auto"] | bool = Field(
        default="auto",
        description="bf16 autocast on the CPU: auto = on where the CPU has AVX-512 BF16 or AMX (native bf16), "
        "true/false to force it",
    )
    channels_last: bool = Field(
        default=True, description="channels_last_3d memory format: much faster 3-D convolutions on CPU and CUDA"
    )
    seed: int = Field(default=0, description="seeds patch sampling and augmentation (a site adds its round and name)")
    val_every: int = Field(default=1, ge=1, description="validate every this many epochs (when val cases given)")
    prox_mu: float = Field(default=0.0, ge=0, description="FedProx proximal weight μ; 0 disables it")
    max_skipped_steps: int = Field(
        default=10, ge=0, description="a federated round with more non-finite (skipped) steps fails at the site"
    )

    @field_validator("patch_size")
    @classmethod
    def _multiple_of_16(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s <= 0 or s % SIZE_MULTIPLE for s in value):
            raise ValueError(f"every side must be a positive multiple of {SIZE_MULTIPLE}, got {value}")
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
