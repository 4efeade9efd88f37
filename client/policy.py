"""A site's policy: the most the server's train task may ask of this site (steps, seconds, batch size, device).

The site admin writes ``policy.toml`` next to the site's label manifest (``DATA/policy.toml``, or ``fed-client join
--policy FILE``); ``join``'s ``--max-steps``, ``--max-seconds`` and ``--max-batch`` override its values::

    max_steps = 200        # local optimiser steps per round
    max_seconds = 900      # wall seconds of local training per round (the loop stops, the reply still goes)
    max_batch = 2          # patches per batch
    devices = ["cpu"]      # devices join may train on

An over-budget task is clamped, never silently: the site log and terminal say what changed and the reply tells the
server (its ``site`` record carries the note). ``devices`` is checked when ``join`` starts (the server's task names
no device: the site's ``--device`` decides it).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedseg.common.errors import ConfigError, format_validation_error
from fedseg.common.fl.protocol import TrainTask

POLICY_FILE = "policy.toml"


class SitePolicy(BaseModel):
    """Caps on what a round's task may ask of this site (None = no cap)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int | None = Field(default=None, ge=1, description="local steps per round")
    max_seconds: float | None = Field(default=None, gt=0, description="seconds of local training per round")
    max_batch: int | None = Field(default=None, ge=1, description="patches per batch")
    devices: tuple[str, ...] | None = Field(default=None, min_length=1, description="devices join may train on")

    def check_device(self, device: str) -> None:
        """Refuse a device the policy does not allow.

        Raises:
            ConfigError: ``device`` is not in ``devices``.
        """
        if self.devices is not None and device not in self.devices:
            raise ConfigError(f"--device {device} is not allowed by the site policy (devices = {list(self.devices)})")

    def clamp(self, task: TrainTask) -> tuple[TrainTask, list[str]]:
        """``task`` within the caps, and one note per value that was lowered."""
        train = task.train
        changes: dict[str, int] = {}
        notes: list[str] = []
        if self.max_steps is not None and train.total_steps > self.max_steps:
            notes.append(f"steps {train.total_steps} -> {self.max_steps} (max_steps)")
            changes["steps"] = self.max_steps
        if self.max_batch is not None and train.batch_size > self.max_batch:
            notes.append(f"batch {train.batch_size} -> {self.max_batch} (max_batch)")
            changes["batch_size"] = self.max_batch
        if not changes:
            return task, notes
        return task.model_copy(update={"train": train.model_copy(update=changes)}), notes


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
    """The site's policy: ``policy_file``, else ``data/policy.toml`` when it exists, else no caps; then the
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
