"""bf16 on the CPU: ``auto`` follows the capability probe (injected here), explicit settings win."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from fedseg.common.engine import device as device_module
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.device import autocast_for, cpu_has_native_bf16, use_cpu_bf16


def _native() -> bool:
    return True


def _emulated() -> bool:
    return False


def _conv_dtype(**kwargs: object) -> torch.dtype:
    conv = torch.nn.Conv3d(1, 2, 3)
    with autocast_for(torch.device("cpu"), **kwargs):  # type: ignore[arg-type]
        dtype: torch.dtype = conv(torch.randn(1, 1, 6, 6, 6)).dtype
        return dtype


def test_auto_is_on_only_where_the_probe_reports_native_bf16() -> None:
    assert use_cpu_bf16("auto", _native) is True
    assert use_cpu_bf16("auto", _emulated) is False
    assert use_cpu_bf16(True, _emulated) is True  # forced on even without native support
    assert use_cpu_bf16(False, _native) is False  # forced off even with it
    assert _conv_dtype(cpu_bf16="auto", native=_native) == torch.bfloat16
    assert _conv_dtype(cpu_bf16="auto", native=_emulated) == torch.float32
    assert _conv_dtype(enabled=False, cpu_bf16=True, native=_native) == torch.float32  # amp off wins


def test_probe_reads_avx512_bf16_and_amx_from_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert cpu_has_native_bf16() is expected
    monkeypatch.setattr(device_module, "_NATIVE_BF16_PROBES", ("_no_such_probe",))
    assert cpu_has_native_bf16() is False  # a torch without the probes: fp32


def test_train_config_defaults_to_auto_and_round_trips() -> None:
    assert TrainConfig().cpu_bf16 == "auto"
    for value in ("auto", True, False):
        cfg = TrainConfig(cpu_bf16=value)
        assert TrainConfig.model_validate_json(cfg.model_dump_json()).cpu_bf16 == value
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"cpu_bf16": "sometimes"})
