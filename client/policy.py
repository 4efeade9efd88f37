"""A site's policy: the most the server's task may ask of this site (time, steps, batch, patch, model, spacing).

The site admin writes ``policy.toml`` next to the site's label manifest (``DATA/policy.toml``, or ``fed-client join
--policy FILE``); ``join``'s ``--max-steps``, ``--max-seconds`` and ``--max-batch`` override its values. Every key
is optional; the defaults let the default federation (``fed-server start``'s and ``fed-server demo``'s settings)
through unchanged and stop a task that would tie the site's machine up::

    max_steps = 200                # local optimiser steps per round (default: no cap)
    max_seconds = 900              # wall seconds per task, from its arrival: preprocessing, training, scoring
                                   # (default: none, the round's deadline decides)
    max_batch = 4                  # patches per batch (default 4)
    max_deadline = 7200            # seconds: a longer round timeout from the server is lowered (default 7200)
    max_patch_voxels = 4194304     # voxels of one training / sliding-window patch (default 2^22: 96x160x160 is 2.5 M)
    max_parameters = 10000000      # parameters of the network the server names (default 10 M: feature_scale 4 is 6.5 M)
    min_spacing_mm = 0.5           # finest target spacing the server may ask to resample to (default 0.5 mm)
    cross_site = true              # score the global model on this site's cases when asked (default true)
    devices = ["cpu"]              # devices join may train on (default: any)

    [privacy]                      # the site's own differential-privacy budget (fedseg.client.budget)
    require_dp = true              # train only tasks with privacy.mode = "dp-sgd" (default false)
    max_epsilon = 8.0              # refuse the round that would take this site's ε past it (default: no cap)
    delta = 1e-5                   # the δ ε is counted at; a task asking for a larger one is lowered (default 1e-5)
    min_noise_multiplier = 1.0     # less noise than this is raised to it (default 0: no floor)
    max_grad_norm = 1.0            # a larger clip norm is lowered to it (default: no cap)
    federation = "pancreas-study"  # count ε under this name, whatever the server calls its federation

Where lowering a value still gives a meaningful task it is clamped, never silently: steps, batch and the deadline.
Where it does not (a smaller patch, another network, a coarser grid would be another task), the task is refused:
the site replies with the reason instead of weights (or scores). Either way the site log and terminal say what the
policy did and the reply tells the server (its ``site`` record: the note under ``policy``, a refusal also under
``failure``). The parameter count is that of the exact network the task names (every ``ModelConfig`` field counts),
built on torch's meta device: no memory is allocated for it.

The time limit is a watchdog (:class:`fedseg.client.training.Watchdog`), not a check between steps: the task's work
runs on a worker thread, and the ClientApp replies by the limit plus a small grace (1 s + 5 %, at most 30 s) whether
or not the work has finished. Training stops before a step that would not end in time and replies with the weights
trained so far; a task still preprocessing, or in a step that overran, at the hard stop gets a failure reply
saying so. ``devices`` is checked when ``join`` starts (the server's task names no device: the site's ``--device``
decides it).

``[privacy]`` works the same way: a task asking for less noise, a larger clip norm or a larger δ than the site allows
is clamped (noise raised, clip norm and δ lowered), a training task without DP-SGD under ``require_dp`` is refused.
The noise a task's ε target implies, and whether the round fits ``max_epsilon``, depend on the site's cases, so
:mod:`fedseg.client.budget` decides those once the cases are loaded, before training.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator
from torch.overrides import TorchFunctionMode

from fedseg.common.errors import ConfigError, format_validation_error
from fedseg.common.fl.protocol import TrainTask
from fedseg.common.nn.model import ModelConfig, build_model, count_parameters
from fedseg.common.privacy.config import DEFAULT_DELTA, PrivacyConfig

POLICY_FILE = "policy.toml"
#: Defaults of the caps the default federation never reaches (see the module docstring).
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_DEADLINE = 7200.0
DEFAULT_MAX_PATCH_VOXELS = 2**22
DEFAULT_MAX_PARAMETERS = 10_000_000
DEFAULT_MIN_SPACING_MM = 0.5


class PrivacyPolicy(BaseModel):
    """The ``[privacy]`` table of ``policy.toml``: the most privacy a task may cost this site (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    require_dp: bool = Field(default=False, description="refuse every training task without privacy.mode = dp-sgd")
    max_epsilon: float | None = Field(
        default=None, gt=0, description="refuse the round that would take the site's cumulative ε past this"
    )
    delta: float = Field(default=DEFAULT_DELTA, gt=0, lt=1, description="the largest δ the site counts ε at")
    min_noise_multiplier: float = Field(default=0.0, ge=0, description="less noise per step is raised to this")
    max_grad_norm: float | None = Field(default=None, gt=0, description="a larger clip norm is lowered to this")
    federation: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="the key the site counts ε under (default: the federation the task names)",
    )


class TaskCaps(BaseModel):
    """The caps on a task, as the policy file and the SuperNode's node-config both hold them (None = no cap).

    Flower's node-config holds flat scalar values, so ``privacy`` travels in it as one JSON string (it is dumped as
    one and read back from one).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int | None = Field(default=None, ge=1, description="local steps per round")
    max_seconds: float | None = Field(default=None, gt=0, description="wall seconds per task, from its arrival")
    max_batch: int = Field(default=DEFAULT_MAX_BATCH, ge=1, description="patches per batch")
    max_deadline: float = Field(default=DEFAULT_MAX_DEADLINE, gt=0, description="longest round timeout accepted")
    max_patch_voxels: int = Field(default=DEFAULT_MAX_PATCH_VOXELS, ge=16**3, description="voxels of one patch")
    max_parameters: int = Field(default=DEFAULT_MAX_PARAMETERS, ge=1, description="parameters of the network")
    min_spacing_mm: float = Field(default=DEFAULT_MIN_SPACING_MM, gt=0, description="finest target spacing")
    cross_site: bool = Field(default=True, description="score the global model on this site's cases when asked")
    privacy: PrivacyPolicy = Field(default=PrivacyPolicy(), description="the site's differential-privacy budget")

    @field_validator("privacy", mode="before")
    @classmethod
    def _privacy_from_json(cls, value: object) -> object:
        return PrivacyPolicy.model_validate_json(value) if isinstance(value, str) else value

    @field_serializer("privacy")
    def _privacy_as_json(self, value: PrivacyPolicy) -> str:
        return value.model_dump_json(exclude_none=True)


@dataclass(frozen=True)
class Review:
    """What the policy made of a task.

    Attributes:
        task: the task within the caps that clamp (steps, batch, deadline).
        notes: one line per clamped value.
        refusal: why the site does not run the task at all (one line), or None.
        seconds: the task's time budget from its arrival: the (clamped) deadline or ``max_seconds``.
        limit: what sets ``seconds``, as the site says it (``max_seconds 900`` or ``deadline 3600 s``).
    """

    task: TrainTask
    notes: tuple[str, ...]
    refusal: str | None
    seconds: float
    limit: str


class SitePolicy(TaskCaps):
    """The caps on what a round's task may ask of this site, and the devices ``join`` may use."""

    devices: tuple[str, ...] | None = Field(default=None, min_length=1, description="devices join may train on")

    def caps(self) -> dict[str, Any]:
        """The caps as :class:`~fedseg.client.site.SiteConfig` keeps them (the node-config's keys)."""
        return self.model_dump(include=set(TaskCaps.model_fields))

    def check_device(self, device: str) -> None:
        """Refuse a device the policy does not allow.

        Raises:
            ConfigError: ``device`` is not in ``devices``.
        """
        if self.devices is not None and device not in self.devices:
            raise ConfigError(f"--device {device} is not allowed by the site policy (devices = {list(self.devices)})")

    def review(self, task: TrainTask, evaluate: bool = False) -> Review:
        """``task`` clamped, or refused, by the caps; ``evaluate``: it is a cross-site scoring request (steps and
        batch do not matter, ``cross_site`` does)."""
        clamped, notes = self.clamp(task, evaluate)
        problems = self.refusals(clamped, evaluate)
        refusal = "the site policy refuses the task: " + "; ".join(problems) if problems else None
        seconds, limit = clamped.deadline, f"deadline {clamped.deadline:g} s"
        if self.max_seconds is not None and self.max_seconds < seconds:
            seconds, limit = self.max_seconds, f"max_seconds {self.max_seconds:g}"
        return Review(clamped, tuple(notes), refusal, seconds, limit)

    def clamp(self, task: TrainTask, evaluate: bool = False) -> tuple[TrainTask, list[str]]:
        """``task`` within the caps that clamp, and one note per value that was lowered."""
        train = task.train
        changes: dict[str, int] = {}
        notes: list[str] = []
        if not evaluate and self.max_steps is not None and train.total_steps > self.max_steps:
            notes.append(f"steps {train.total_steps} -> {self.max_steps} (max_steps)")
            changes["steps"] = self.max_steps
        if not evaluate and train.batch_size > self.max_batch:
            notes.append(f"batch {train.batch_size} -> {self.max_batch} (max_batch)")
            changes["batch_size"] = self.max_batch
        update: dict[str, object] = {"train": train.model_copy(update=changes)} if changes else {}
        if task.deadline > self.max_deadline:
            notes.append(f"deadline {task.deadline:g} s -> {self.max_deadline:g} s (max_deadline)")
            update["deadline"] = self.max_deadline
        privacy = task.privacy if evaluate else clamp_privacy(task.privacy, self.privacy, notes)
        if privacy is not task.privacy:
            update["privacy"] = privacy
        return (task.model_copy(update=update) if update else task), notes

    def refusals(self, task: TrainTask, evaluate: bool = False) -> list[str]:
        """Why the site will not run ``task`` (empty: it will): what no clamp can make a meaningful task of."""
        problems: list[str] = []
        if evaluate and not self.cross_site:
            problems.append("this site does not score models for other sites (cross_site = false)")
        if not evaluate and self.privacy.require_dp and task.privacy.mode != "dp-sgd":
            problems.append(
                f"this site trains only with patient-level DP (require_dp); the task has privacy.mode "
                f"{task.privacy.mode}, the server must set privacy.mode=dp-sgd"
            )
        patch = task.train.patch_size
        if math.prod(patch) > self.max_patch_voxels:
            problems.append(
                f"patch {'x'.join(map(str, patch))} is {math.prod(patch)} voxels (max_patch_voxels "
                f"{self.max_patch_voxels})"
            )
        params = parameter_count(task.model)
        if params is None or params > self.max_parameters:
            size = "cannot be sized" if params is None else f"has {params} parameters"
            problems.append(f"{_network(task.model)} {size} (max_parameters {self.max_parameters})")
        finest = min(task.preprocess.target_spacing)
        if finest < self.min_spacing_mm:
            problems.append(f"target spacing {finest:g} mm is finer than min_spacing_mm {self.min_spacing_mm:g}")
        return problems


def clamp_privacy(asked: PrivacyConfig, policy: PrivacyPolicy, notes: list[str]) -> PrivacyConfig:
    """``asked`` within ``policy`` (clip norm and δ lowered, an explicit noise multiplier raised), a note appended to
    ``notes`` per change; ``asked`` itself when nothing changes or the task asks for no DP-SGD. The noise an ε target
    implies is clamped once the cases are known (:meth:`fedseg.client.budget.SiteBudget.plan`)."""
    if asked.mode != "dp-sgd":
        return asked
    changes: dict[str, float] = {}
    if policy.max_grad_norm is not None and asked.max_grad_norm > policy.max_grad_norm:
        notes.append(f"max_grad_norm {asked.max_grad_norm:g} -> {policy.max_grad_norm:g} (privacy.max_grad_norm)")
        changes["max_grad_norm"] = policy.max_grad_norm
    if asked.epsilon is None and asked.noise_multiplier < policy.min_noise_multiplier:
        notes.append(
            f"noise_multiplier {asked.noise_multiplier:g} -> {policy.min_noise_multiplier:g} "
            "(privacy.min_noise_multiplier)"
        )
        changes["noise_multiplier"] = policy.min_noise_multiplier
    if asked.delta > policy.delta:
        notes.append(f"delta {asked.delta:g} -> {policy.delta:g} (privacy.delta)")
        changes["delta"] = policy.delta
    return asked.model_copy(update=changes) if changes else asked


def parameter_count(cfg: ModelConfig) -> int | None:
    """Parameters of the network ``cfg`` names, built on torch's meta device (shapes only: no memory, ~20 ms);
    None when even its shapes overflow (absurd channel or class counts)."""
    try:
        with torch.device("meta"), _ShapesOnly():
            return count_parameters(build_model(cfg))
    except (RuntimeError, ValueError, OverflowError):
        return None


class _ShapesOnly(TorchFunctionMode):
    """Skips weight initialisation (``torch.nn.init``, ``Tensor.normal_``): meta tensors hold no values anyway, and
    the first ``normal_`` on the meta device imports torch's Python reference kernels (2 s, sympy included)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init" or func is torch.Tensor.normal_:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


def _network(cfg: ModelConfig) -> str:
    return f"the {cfg.arch} (feature_scale {cfg.feature_scale}, {cfg.in_channels} channels in, {cfg.n_classes} classes)"


def read_policy(path: Path) -> SitePolicy:
    """The policy in ``path``.

    Raises:
        ConfigError: the file is missing, not TOML, or has unknown or invalid keys (one line saying which).
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"site policy {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"site policy {path} is not valid TOML ({err})") from None
    try:
        return SitePolicy.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"site policy {path}: {format_validation_error(err)}") from None


def site_policy(data: Path, policy_file: Path | None, overrides: Mapping[str, float | int | None]) -> SitePolicy:
    """The site's policy: ``policy_file``, else ``data/policy.toml`` when it exists, else the defaults; then the
    non-None ``overrides`` (join's ``--max-*`` options).

    Raises:
        ConfigError: the file or an override is invalid.
    """
    path = policy_file if policy_file is not None else data / POLICY_FILE
    base = read_policy(path) if policy_file is not None or path.is_file() else SitePolicy()
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SitePolicy.model_validate({**base.model_dump(exclude_none=True), **values})
    except ValidationError as err:
        raise ConfigError(f"site policy: {format_validation_error(err)}") from None
