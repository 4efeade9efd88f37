"""Device policy: device names in configs, resolving them on this machine, autocast, and seeding."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from contextlib import nullcontext
from typing import Annotated, Any, Literal

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


#: ``TrainConfig.cpu_bf16`` and inference: bf16 autocast on the CPU on, off, or ``auto`` (on where native).
CpuBf16 = Literal["auto"] | bool

#: ``torch.cpu`` probes of the instruction sets that run bf16 natively (oneDNN uses them for bf16 convolutions).
_NATIVE_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_has_native_bf16() -> bool:
    """True when torch reports AVX-512 BF16 or AMX on this CPU (bf16 convolutions run natively, not emulated)."""
    for name in _NATIVE_BF16_PROBES:
        probe = getattr(torch.cpu, name, None)
        if probe is not None and bool(probe()):
            return True
    return False


def use_cpu_bf16(setting: CpuBf16, native: Callable[[], bool] = cpu_has_native_bf16) -> bool:
    """Resolve a ``cpu_bf16`` setting: ``auto`` asks ``native`` (the capability probe), a bool is taken as is."""
    if setting == "auto":
        return native()
    return bool(setting)


def autocast_for(
    device: torch.device,
    enabled: bool = True,
    cpu_bf16: CpuBf16 = False,
    native: Callable[[], bool] = cpu_has_native_bf16,
) -> Any:
    """bf16 autocast on CUDA when enabled; on the CPU only when ``cpu_bf16`` resolves to on, else exact fp32.

    ``cpu_bf16="auto"`` turns it on where the CPU runs bf16 natively (AVX-512 BF16 or AMX, see
    :func:`cpu_has_native_bf16`; ``native`` replaces that probe in tests). ``bench/cpu_bf16.py`` times a
    training step both ways.
    """
    if autocast_active(device, enabled, cpu_bf16, native):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def autocast_active(
    device: torch.device,
    enabled: bool = True,
    cpu_bf16: CpuBf16 = False,
    native: Callable[[], bool] = cpu_has_native_bf16,
) -> bool:
    """Whether :func:`autocast_for` with these arguments runs bf16 (CUDA when enabled; the CPU as ``cpu_bf16``)."""
    if not enabled:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and use_cpu_bf16(cpu_bf16, native)
