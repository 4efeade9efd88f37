"""Sliding-window inference (window sizing, exact blending, padding, attention maps) and validation Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fedseg.common.data.preprocess import Grid, PreparedCase, SourceGeometry
from fedseg.common.engine.inference import gate_maps, sliding_window_predict, window_size
from fedseg.common.engine.validation import case_dice, validate
from fedseg.common.eval.attention_export import inside_outside
from fedseg.common.nn.model import AttentionUNet3D, ModelConfig, build_model


class VoxelwiseNet(nn.Module):
    """A 1x1x1 conv: every voxel's output depends only on that voxel, so blending must be exact."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv3d(1, n_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"window {tuple(x.shape)} not a multiple of 16")
        out: Tensor = self.head(x)
        return out

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        alpha = torch.sigmoid(x).repeat(1, 2, 1, 1, 1)
        return self.forward(x), {"att2": alpha, "att3": 1 - alpha}


def test_window_size_shrinks_to_volume_rounded_up_to_16() -> None:
    assert window_size((30, 101, 200), (64, 96, 96)) == (32, 96, 96)
    assert window_size((16, 16, 16), (32, 32, 32)) == (16, 16, 16)
    assert window_size((17, 40, 8), (32, 32, 32)) == (32, 32, 16)


def test_window_size_rejects_bad_patch() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        window_size((32, 32, 32), (32, 30, 32))


def test_sliding_window_voxelwise_model_matches_full_volume() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(30, 50, 70)).astype(np.float32)
    net = VoxelwiseNet()
    pred = sliding_window_predict(net, image, (32, 32, 32), "cpu", overlap=0.5, cpu_bf16=False)
    with torch.no_grad():
        full = torch.softmax(net.head(torch.from_numpy(image)[None, None]), dim=1)[0].numpy()
    assert pred.probabilities.shape == (3, 30, 50, 70)
    assert pred.probabilities.dtype == np.float32
    np.testing.assert_allclose(pred.probabilities, full, atol=1e-5)
    np.testing.assert_array_equal(pred.labels, full.argmax(axis=0))
    assert pred.labels.dtype == np.uint8
    assert pred.attention == {}


def test_sliding_window_blends_attention_maps() -> None:
    image = np.linspace(-2, 2, 20 * 20 * 20, dtype=np.float32).reshape(20, 20, 20)
    pred = sliding_window_predict(VoxelwiseNet(), image, (16, 16, 16), "cpu", attention=True)
    assert sorted(pred.attention) == ["att2", "att3"]
    expected = 1 / (1 + np.exp(-image))
    assert pred.attention["att2"].shape == (2, 20, 20, 20)
    np.testing.assert_allclose(pred.attention["att2"][1], expected, atol=1e-5)
    np.testing.assert_allclose(pred.attention["att3"][0], 1 - expected, atol=1e-5)


class RampNet(nn.Module):
    """Class 1 logit = 4 * x / (W - 1) within the window, class 0 logit = 0: not mirror-equivariant in x."""

    def forward(self, x: Tensor) -> Tensor:
        width = x.shape[-1]
        ramp = (4.0 * torch.arange(width, dtype=torch.float32) / (width - 1)).expand(x.shape)
        return torch.cat([torch.zeros_like(x), ramp], dim=1)


def test_tta_averages_the_in_plane_mirrorings_hand_computed() -> None:
    image = np.zeros((16, 16, 16), np.float32)
    plain = sliding_window_predict(RampNet(), image, (16, 16, 16), "cpu")
    tta = sliding_window_predict(RampNet(), image, (16, 16, 16), "cpu", tta=True)
    sigmoid = 1 / (1 + np.exp(-4.0 * np.arange(16) / 15))
    np.testing.assert_allclose(plain.probabilities[1, 3, 5], sigmoid, atol=1e-6)
    # half the mirrorings flip x: the average is symmetric, (σ(r) + σ(reversed r)) / 2
    np.testing.assert_allclose(tta.probabilities[1, 3, 5], (sigmoid + sigmoid[::-1]) / 2, atol=1e-6)
    np.testing.assert_allclose(tta.probabilities.sum(axis=0), 1.0, atol=1e-6)


def test_tta_leaves_a_voxelwise_model_unchanged() -> None:
    image = np.random.default_rng(2).normal(size=(20, 24, 28)).astype(np.float32)
    plain = sliding_window_predict(VoxelwiseNet(), image, (16, 16, 16), "cpu", attention=True)
    tta = sliding_window_predict(VoxelwiseNet(), image, (16, 16, 16), "cpu", attention=True, tta=True)
    np.testing.assert_allclose(tta.probabilities, plain.probabilities, atol=1e-5)
    np.testing.assert_allclose(tta.attention["att2"], plain.attention["att2"], atol=1e-5)
    np.testing.assert_array_equal(tta.labels, plain.labels)


def test_sliding_window_restores_training_mode() -> None:
    net = VoxelwiseNet().train()
    sliding_window_predict(net, np.zeros((16, 16, 16), np.float32), (16, 16, 16), "cpu")
    assert net.training


def test_attention_requires_gated_model() -> None:
    class Plain(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.cat([x, -x], dim=1)

    with pytest.raises(ValueError, match="no attention gates"):
        sliding_window_predict(Plain(), np.zeros((16, 16, 16), np.float32), (16, 16, 16), "cpu", attention=True)


def test_attention_unet_odd_volume_keeps_shape() -> None:
    torch.manual_seed(0)
    net = AttentionUNet3D(n_classes=5, feature_scale=16)
    image = np.random.default_rng(0).normal(size=(20, 23, 18)).astype(np.float32)
    pred = sliding_window_predict(net, image, (16, 32, 32), "cpu", attention=True)
    assert pred.probabilities.shape == (5, 20, 23, 18)
    np.testing.assert_allclose(pred.probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert sorted(pred.attention) == ["att2", "att3", "att4"]
    for alpha in pred.attention.values():
        assert alpha.shape == (2, 20, 23, 18)
        assert alpha.min() >= 0.0 and alpha.max() <= 1.0


class ConstantNet(nn.Module):
    """Predicts class ``cls`` everywhere."""

    def __init__(self, cls: int, n_classes: int = 5) -> None:
        super().__init__()
        self.cls, self.n_classes = cls, n_classes

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.zeros(x.shape[0], self.n_classes, *x.shape[2:])
        logits[:, self.cls] = 10.0
        return logits


def _case(case_id: str, annotated: tuple[bool, ...]) -> PreparedCase:
    label = np.zeros((16, 16, 16), np.uint8)
    label[:4, :4, :4] = 2  # 64 spleen voxels
    label[8:16, 8:12, 8:12] = 4  # 128 liver voxels
    grid = Grid((16, 16, 16), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    label[~np.asarray(annotated)[label]] = 0  # a site without an organ's annotation labels it background
    return PreparedCase(case_id, np.zeros((16, 16, 16), np.float32), label, annotated, SourceGeometry(grid, grid))


def test_validate_hand_computed_and_nan_aware() -> None:
    full = _case("a", (True, False, True, False, True))
    liver_only = _case("b", (True, False, False, False, True))
    result = validate(ConstantNet(cls=2), [full, liver_only], (16, 16, 16), "cpu")
    spleen = 2 * 64 / (64 + 16**3)  # the whole volume is predicted spleen
    assert result["dice_spleen"] == pytest.approx(spleen)  # case b does not annotate spleen: NaN, ignored
    assert result["dice_liver"] == 0.0
    assert np.isnan(result["dice_pancreas"]) and np.isnan(result["dice_kidney"])
    assert result["dice_mean"] == pytest.approx(spleen / 2)
    assert list(result) == ["dice_pancreas", "dice_spleen", "dice_kidney", "dice_liver", "dice_mean"]


def test_validate_rejects_unlabelled_cases_and_wrong_names() -> None:
    case = _case("a", (True,) * 5)
    unlabelled = PreparedCase("u", case.image, None, case.annotated, case.source)
    with pytest.raises(ValueError, match="at least one case with a label"):
        validate(ConstantNet(cls=0), [unlabelled], (16, 16, 16), "cpu")
    with pytest.raises(ValueError, match="2 class names"):
        validate(ConstantNet(cls=0), [case], (16, 16, 16), "cpu", class_names=("background", "liver"))


def test_case_dice_marks_unannotated_classes_nan() -> None:
    case = _case("a", (True, False, True, False, True))
    dice = case_dice(case.label if case.label is not None else np.zeros(0), case, 5)
    np.testing.assert_array_equal(np.isnan(dice), [False, True, False, True, False])
    assert dice[2] == 1.0 and dice[4] == 1.0


def test_gate_maps_average_sub_gates_and_inside_outside() -> None:
    alpha = np.stack([np.full((2, 2, 2), 0.2, np.float32), np.full((2, 2, 2), 0.6, np.float32)])
    alpha[:, 0, 0, 0] = 1.0
    maps = gate_maps({"att2": alpha})
    assert maps["att2"].shape == (2, 2, 2)
    assert maps["att2"][1, 1, 1] == pytest.approx(0.4) and maps["att2"][0, 0, 0] == pytest.approx(1.0)
    mask = np.zeros((2, 2, 2), np.uint8)
    mask[0, 0, 0] = 3
    inside, outside = inside_outside(maps["att2"], mask)
    assert inside == pytest.approx(1.0) and outside == pytest.approx(0.4)
    assert np.isnan(inside_outside(maps["att2"], np.zeros((2, 2, 2)))[0])


class NanUnderBf16(VoxelwiseNet):
    """Returns NaN whenever bf16 autocast is on (the flaky oneDNN kernels of some CPUs, every time)."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out * float("nan") if torch.is_autocast_enabled("cpu") else out


def test_a_bf16_prediction_that_is_not_finite_is_made_again_in_fp32() -> None:
    image = np.random.default_rng(2).normal(size=(20, 20, 20)).astype(np.float32)
    pred = sliding_window_predict(NanUnderBf16(), image, (16, 16, 16), "cpu", cpu_bf16=True)
    exact = sliding_window_predict(VoxelwiseNet(), image, (16, 16, 16), "cpu", cpu_bf16=False)
    assert np.isfinite(pred.probabilities).all()
    np.testing.assert_array_equal(pred.probabilities, exact.probabilities)


def test_the_progress_bar_counts_monais_own_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedseg.common.engine import inference

    model = build_model(ModelConfig(feature_scale=16)).eval()
    image = np.zeros((24, 40, 56), np.float32)
    seen: list[int] = []
    real = inference._predictor

    def counting(model: torch.nn.Module, attention: bool, done: object = None) -> object:
        run = real(model, attention, done)  # type: ignore[arg-type]

        def wrapped(window: torch.Tensor) -> object:
            seen.append(window.shape[0])
            return run(window)

        return wrapped

    monkeypatch.setattr(inference, "_predictor", counting)
    advanced: list[float] = []
    monkeypatch.setattr(inference.Progress, "advance", lambda self, task, n: advanced.append(n))
    inference.sliding_window_predict(model, image, (16, 32, 32), "cpu", overlap=0.5, amp=False, progress=True)
    assert sum(seen) == inference.window_count(image.shape, (16, 32, 32), 0.5) == sum(advanced)
    assert inference.window_count((10, 20, 20), (16, 32, 32), 0.5) == 1  # smaller than the window: padded, one
