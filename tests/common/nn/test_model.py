"""AttentionUNet3D / UNet3D: shapes, exact parameter counts, gate initialisation, input checks, determinism."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from fedseg.common.nn.blocks import GridAttentionBlock3D, MultiAttentionBlock
from fedseg.common.nn.model import AttentionUNet3D, ModelConfig, UNet3D, build_model, count_parameters

SHAPES = [(32, 32, 32), (48, 32, 16)]


def _meta_count(model_cls: type[nn.Module], **kwargs: object) -> int:
    with torch.device("meta"):
        return count_parameters(model_cls(**kwargs))


@pytest.mark.parametrize("model_cls", [AttentionUNet3D, UNet3D])
@pytest.mark.parametrize("size", SHAPES)
def test_logits_have_input_size_and_class_channels(model_cls: type[nn.Module], size: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = model_cls(in_channels=2, n_classes=3, feature_scale=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("model_cls", "feature_scale", "expected"),
    [
        (AttentionUNet3D, 4, 6_473_322),
        (UNet3D, 4, 5_888_004),
        (AttentionUNet3D, 3, 11_434_121),
        (UNet3D, 3, 10_403_190),
    ],
)
def test_parameter_counts_match_the_released_code(
    model_cls: type[nn.Module], feature_scale: int, expected: int
) -> None:
    assert _meta_count(model_cls, in_channels=1, n_classes=4, feature_scale=feature_scale) == expected


def test_attention_unet_parameter_breakdown_matches_design_doc() -> None:
    with torch.device("meta"):
        model = AttentionUNet3D(in_channels=1, n_classes=4, feature_scale=4)
    expected = {
        "conv1": 7_440,
        "conv2": 41_664,
        "conv3": 166_272,
        "conv4": 664_320,
        "center": 2_655_744,
        "gating": 66_304,
        "attentionblock2": 24_994,
        "attentionblock3": 99_138,
        "attentionblock4": 394_882,
        "up_concat4": 1_770_240,
        "up_concat3": 442_752,
        "up_concat2": 110_784,
        "up_concat1": 27_744,
    }
    got = {name: count_parameters(child) for name, child in model.named_children()}
    assert {k: got[k] for k in expected} == expected
    gate = model.attentionblock4.gate_block_1
    assert [count_parameters(m) for m in (gate.theta, gate.phi, gate.psi, gate.W)] == [131_072, 32_896, 129, 16_768]
    assert gate.theta.bias is None and gate.theta.kernel_size == (2, 2, 2) and gate.theta.stride == (2, 2, 2)
    # The released net has 236 state tensors (params + BN buffers); the finest skip has no attention block.
    assert len(model.state_dict()) == 236
    assert sum(isinstance(m, MultiAttentionBlock) for m in model.modules()) == 3


def _alpha_means(gate_init: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = AttentionUNet3D(n_classes=3, feature_scale=8, gate_init=gate_init).train()  # type: ignore[arg-type]
    with torch.no_grad():
        _, maps = model.forward_with_attention(torch.randn(1, 1, 32, 32, 32))
    return {name: float(alpha.mean()) for name, alpha in maps.items()}


def test_pass_through_gates_start_near_095_and_released_gates_lower() -> None:
    pass_through = _alpha_means("pass-through")
    released = _alpha_means("released")
    assert set(pass_through) == {"att2", "att3", "att4"}
    for mean in pass_through.values():
        assert mean == pytest.approx(0.95, abs=0.015)
    assert sum(released.values()) / 3 < 0.8


def test_pass_through_sets_psi_bias_to_three() -> None:
    torch.manual_seed(0)
    model = AttentionUNet3D(feature_scale=16)
    gates = [m for m in model.modules() if isinstance(m, GridAttentionBlock3D)]
    assert len(gates) == 6
    assert all(g.psi.bias is not None and torch.all(g.psi.bias == 3.0) for g in gates)


def test_gate_with_zero_psi_weights_scales_every_voxel_by_sigmoid_of_bias() -> None:
    torch.manual_seed(0)
    gate = GridAttentionBlock3D(in_channels=4, gating_channels=6).eval()
    with torch.no_grad():
        gate.psi.weight.zero_()
        assert gate.psi.bias is not None
        gate.psi.bias.fill_(-1.0)
    x = torch.randn(2, 4, 8, 6, 4)
    out, alpha = gate(x, torch.randn(2, 6, 4, 3, 2))
    expected_alpha = 1.0 / (1.0 + torch.exp(torch.tensor(1.0)))
    assert alpha.shape == (2, 1, 8, 6, 4)
    torch.testing.assert_close(alpha, torch.full_like(alpha, float(expected_alpha)))
    torch.testing.assert_close(out, gate.W(expected_alpha * x))


@pytest.mark.parametrize("size", SHAPES)
def test_attention_maps_are_two_channel_at_input_size(size: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = AttentionUNet3D(n_classes=2, feature_scale=16, gate_init="released").eval()
    x = torch.randn(3, 1, *size)
    with torch.no_grad():
        logits, maps = model.forward_with_attention(x)
        plain = model(x)
    torch.testing.assert_close(logits, plain)
    assert sorted(maps) == ["att2", "att3", "att4"]
    for alpha in maps.values():
        assert alpha.shape == (3, 2, *size)
        assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0


@pytest.mark.parametrize("model_cls", [AttentionUNet3D, UNet3D])
@pytest.mark.parametrize("bad", [(40, 32, 32), (32, 32, 8), (100, 100, 100)])
def test_sides_not_divisible_by_16_raise_value_error(model_cls: type[nn.Module], bad: tuple[int, int, int]) -> None:
    model = model_cls(feature_scale=16)
    with pytest.raises(ValueError, match=r"multiple of 16") as info:
        model(torch.zeros(1, 1, *bad))
    assert str(bad) in str(info.value)


def test_wrong_channel_count_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        UNet3D(feature_scale=16)(torch.zeros(1, 2, 16, 16, 16))


@pytest.mark.parametrize("model_cls", [AttentionUNet3D, UNet3D])
def test_backward_reaches_every_parameter(model_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = model_cls(n_classes=3, feature_scale=16).train()
    logits = model(torch.randn(2, 1, 16, 32, 16))
    target = torch.randint(0, 3, (2, 16, 32, 16))
    nn.functional.cross_entropy(logits, target).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["attention-unet", "unet"])
def test_same_seed_gives_identical_weights(arch: str) -> None:
    cfg = ModelConfig(arch=arch, feature_scale=16)  # type: ignore[arg-type]
    torch.manual_seed(7)
    first = build_model(cfg).state_dict()
    torch.manual_seed(7)
    second = build_model(cfg).state_dict()
    torch.manual_seed(8)
    other = build_model(cfg).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["conv1.conv1.0.weight"], other["conv1.conv1.0.weight"])


@torch.no_grad()
def test_init_follows_released_scheme() -> None:
    torch.manual_seed(0)
    model = UNet3D(feature_scale=2)
    conv = model.center.conv2[0]
    fan_in = conv.in_channels * 27
    assert float(conv.weight.std()) == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.02)
    bn = model.center.conv2[1]
    assert float(bn.weight.mean()) == pytest.approx(1.0, abs=0.01)
    assert float(bn.weight.std()) == pytest.approx(0.02, rel=0.25)
    assert torch.all(bn.bias == 0)


def test_build_model_follows_config() -> None:
    att = build_model(ModelConfig(n_classes=4, feature_scale=16, gate_init="released"))
    unet = build_model(ModelConfig(arch="unet", in_channels=2, feature_scale=16))
    assert isinstance(att, AttentionUNet3D) and att.final.out_channels == 4
    assert isinstance(unet, UNet3D) and unet.conv1.conv1[0].in_channels == 2
    assert att.attentionblock2.gate_block_1.psi.bias is not None
    assert not torch.all(att.attentionblock2.gate_block_1.psi.bias == 3.0)


def test_model_config_is_frozen_and_strict() -> None:
    cfg = ModelConfig()
    assert (cfg.arch, cfg.in_channels, cfg.n_classes, cfg.feature_scale, cfg.gate_init) == (
        "attention-unet",
        1,
        5,
        4,
        "pass-through",
    )
    with pytest.raises(ValidationError):
        ModelConfig(arch="vnet")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ModelConfig(n_layers=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        ModelConfig(feature_scale=0)
    with pytest.raises(ValidationError):
        cfg.n_classes = 3
