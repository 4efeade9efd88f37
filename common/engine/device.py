"""Device policy: device names in configs, resolving them on this machine, autocast, and seeding."""

from __future__ import annotations

import random
import re
from contextlib import nullcontext
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import AfterValidator

from fedseg.common.errors import ConfigError

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


def autocast_for(device: torch.device, enabled: bool = True, cpu_bf16: bool = False) -> Any:
    """bf16 autocast on CUDA when enabled; on the CPU only with ``cpu_bf16`` too, else a no-op (exact fp32).

    CPUs with AVX-512 BF16 or AMX run 3-D convolutions faster in bf16 (``bench/cpu_bf16.py`` times a training
    step both ways); CPUs without it emulate bf16 and are slower.
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()
