"""The trainer's finiteness guard: a step whose loss or gradients are not finite applies no update and is counted;
under bf16 autocast it is first computed again in fp32, and a failed attempt leaves BatchNorm's statistics as they
were."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedseg.common.data.io import Volume
from fedseg.common.data.manifest import LabelManifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig, preprocess_case
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.train import train_model
from fedseg.common.nn.model import ModelConfig, build_model


def _case() -> PreparedCase:
    rng = np.random.default_rng(0)
    hu = rng.normal(-50.0, 15.0, (16, 16, 16)).astype(np.float32)
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:10, 4:10, 4:10] = 1
    hu[label == 1] += 180.0
    geometry = {"spacing": (2.0, 2.0, 2.0), "origin": (0.0, 0.0, 0.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}
    return preprocess_case(
        Volume(hu, **geometry), Volume(label, **geometry), LabelManifest(labels={1: "spleen"}), PreprocessConfig()
    )


def _cfg(steps: int, cpu_bf16: bool = False) -> TrainConfig:
    return TrainConfig(steps=steps, patch_size=(16, 16, 16), batch_size=2, lr=1e-2, augment=False, cpu_bf16=cpu_bf16)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(feature_scale=64))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_non_finite_loss_steps_are_skipped_and_counted() -> None:
    model = _model()
    calls = {"n": 0}

    def poison(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * float("nan") if calls["n"] in (2, 4) else output

    model.register_forward_hook(poison)
    report = train_model(model, [_case()], _cfg(5), "cpu", progress=False)
    assert report.steps == 5 and report.skipped_steps == 2
    assert [np.isnan(x) for x in report.loss_history] == [False, True, False, True, False]
    assert np.isfinite(report.mean_loss)
    assert report.mean_loss == np.mean([report.loss_history[i] for i in (0, 2, 4)])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_skipped_step_leaves_the_weights_untouched() -> None:
    model = _model()
    before = _params(model)
    first = next(iter(model.parameters()))
    first.register_hook(lambda grad: grad * float("inf"))  # finite loss, infinite gradient
    report = train_model(model, [_case()], _cfg(2), "cpu", progress=False)
    assert report.skipped_steps == 2
    after = _params(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finite_training_skips_nothing() -> None:
    report = train_model(_model(), [_case()], _cfg(2), "cpu", progress=False)
    assert report.skipped_steps == 0 and all(np.isfinite(report.loss_history))


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def test_a_step_not_finite_in_bf16_is_computed_again_in_fp32() -> None:
    model = _model()
    before = _params(model)
    seen: list[bool] = []

    def nan_under_bf16(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        low = torch.is_autocast_enabled("cpu")
        seen.append(low)
        return output * float("nan") if low else output

    model.register_forward_hook(nan_under_bf16)
    report = train_model(model, [_case()], _cfg(3, cpu_bf16=True), "cpu", progress=False)
    assert seen == [True, False] * 3  # every step: bf16 first, then fp32
    assert report.skipped_steps == 0 and report.fp32_retries == 3
    assert all(np.isfinite(report.loss_history))
    after = _params(model)
    assert all(bool(torch.isfinite(v).all()) for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fp32_has_no_retry_and_a_step_failing_both_ways_is_skipped() -> None:
    calls = {"fp32": 0}

    def always_nan(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        calls["fp32"] += not torch.is_autocast_enabled("cpu")
        return output * float("nan")

    model = _model()
    model.register_forward_hook(always_nan)
    report = train_model(model, [_case()], _cfg(2, cpu_bf16=True), "cpu", progress=False)
    assert report.skipped_steps == 2 and report.fp32_retries == 2 and calls["fp32"] == 2
    fp32 = _model()
    fp32.register_forward_hook(always_nan)
    report = train_model(fp32, [_case()], _cfg(2), "cpu", progress=False)
    assert report.skipped_steps == 2 and report.fp32_retries == 0


def test_a_failed_step_leaves_batchnorm_statistics_as_they_were() -> None:
    model = _model()
    norm = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    norm.register_forward_pre_hook(lambda module, inputs: (inputs[0] * float("nan"),))
    before = _bn_buffers(model)
    report = train_model(model, [_case()], _cfg(2), "cpu", progress=False)
    assert report.skipped_steps == 2
    after = _bn_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no NaN running mean, no counted batches
