"""The paper-exact 3D Attention U-Net (``unet_CT_multi_att_dsv_3D``) and its U-Net baseline (``unet_CT_dsv_3D``).

Both follow ``shared/design/attention-unet.md`` to the letter: 5 double-conv levels with max-pooling, a
parameter-free trilinear decoder, and a deep-supervision fusion head. Module names match the released code, so
its state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fedseg.common.nn.blocks import (
    NORMS,
    GridAttentionBlock3D,
    MultiAttentionBlock,
    Norm,
    UnetConv3,
    UnetDsv3,
    UnetGridGatingSignal3,
    UnetUp3CT,
    init_weights,
)

#: Every spatial side of the input must be a multiple of this (four 2× poolings).
SIZE_MULTIPLE = 16
_BASE_FILTERS = (64, 128, 256, 512, 1024)

GateInit = Literal["pass-through", "released"]


class ModelConfig(BaseModel):
    """Which network to build; validated once at the edge (CLI, run config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Literal["attention-unet", "unet"] = Field(
        default="attention-unet", description="attention-unet (Oktay et al. 2018) or its U-Net baseline"
    )
    in_channels: int = Field(default=1, ge=1, description="image channels (1 for CT)")
    n_classes: int = Field(default=5, ge=1, description="output classes, background included")
    feature_scale: int = Field(
        default=4, ge=1, le=64, description="divides the base filters 64..1024; 4 is the paper's CT network"
    )
    gate_init: GateInit = Field(
        default="pass-through",
        description="attention gates at start: pass-through (alpha about 0.95, the paper's text) or released "
        "(the official code's kaiming-initialised psi, alpha about 0.3-0.7)",
    )
    norm: Norm = Field(
        default="batch",
        description="batch (the paper's BatchNorm) or a per-case norm: group (GroupNorm, up to 8 groups) or "
        "instance; DP-SGD needs a per-case one",
    )


def check_spatial_size(size: Sequence[int]) -> None:
    """Raise ``ValueError`` unless every spatial side (D, H, W) is a positive multiple of 16.

    Args:
        size: The spatial sides (D, H, W).

    Raises:
        ValueError: A side is not a positive multiple of 16; the message names the shape and the rule.
    """
    sides = tuple(int(s) for s in size)
    if len(sides) != 3 or any(s <= 0 or s % SIZE_MULTIPLE for s in sides):
        raise ValueError(
            f"input spatial size {sides} is not valid: every side (D, H, W) must be a positive multiple of "
            f"{SIZE_MULTIPLE} (four 2x poolings); pad or crop it, e.g. to {_nearest_valid(sides)}"
        )


def _nearest_valid(sides: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(SIZE_MULTIPLE, -(-s // SIZE_MULTIPLE) * SIZE_MULTIPLE) for s in sides)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (weights, biases and BN affine terms; running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


class _DsvUNetBase(nn.Module):
    """Encoder, trilinear decoder and deep-supervision fusion head shared by both networks."""

    def __init__(self, in_channels: int, n_classes: int, feature_scale: int, norm: Norm = "batch") -> None:
        super().__init__()
        if in_channels < 1 or n_classes < 1 or not 1 <= feature_scale <= _BASE_FILTERS[0]:
            raise ValueError(
                f"need in_channels >= 1, n_classes >= 1 and 1 <= feature_scale <= 64, got "
                f"{in_channels}, {n_classes}, {feature_scale}"
            )
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.norm = norm
        f = [int(c / feature_scale) for c in _BASE_FILTERS]
        self.filters = tuple(f)
        self.conv1 = UnetConv3(in_channels, f[0], norm)
        self.conv2 = UnetConv3(f[0], f[1], norm)
        self.conv3 = UnetConv3(f[1], f[2], norm)
        self.conv4 = UnetConv3(f[2], f[3], norm)
        self.center = UnetConv3(f[3], f[4], norm)
        self.maxpool = nn.MaxPool3d(kernel_size=2, stride=2)
        self.up_concat4 = UnetUp3CT(f[4], f[3], norm)
        self.up_concat3 = UnetUp3CT(f[3], f[2], norm)
        self.up_concat2 = UnetUp3CT(f[2], f[1], norm)
        self.up_concat1 = UnetUp3CT(f[1], f[0], norm)
        self.dsv4 = UnetDsv3(f[3], n_classes, scale_factor=8)
        self.dsv3 = UnetDsv3(f[2], n_classes, scale_factor=4)
        self.dsv2 = UnetDsv3(f[1], n_classes, scale_factor=2)
        self.dsv1 = nn.Conv3d(f[0], n_classes, kernel_size=1)
        self.final = nn.Conv3d(4 * n_classes, n_classes, kernel_size=1)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, D, H, W), got shape {tuple(x.shape)}")
        try:
            check_spatial_size(x.shape[2:])
        except ValueError as err:
            raise ValueError(f"input of shape {tuple(x.shape)}: {err}") from None

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        conv1 = self.conv1(x)
        conv2 = self.conv2(self.maxpool(conv1))
        conv3 = self.conv3(self.maxpool(conv2))
        conv4 = self.conv4(self.maxpool(conv3))
        center = self.center(self.maxpool(conv4))
        return conv1, conv2, conv3, conv4, center

    def _fuse_heads(self, up4: Tensor, up3: Tensor, up2: Tensor, up1: Tensor) -> Tensor:
        heads = [self.dsv1(up1), self.dsv2(up2), self.dsv3(up3), self.dsv4(up4)]
        out: Tensor = self.final(torch.cat(heads, dim=1))
        return out


class AttentionUNet3D(_DsvUNetBase):
    """Released 3D Attention U-Net with two grid gates per gated scale and deep-supervision fusion.

    conv4 is gated by gating(center), conv3 by up4 and conv2 by up3; the full-resolution skip conv1 is not gated.

    Args:
        in_channels: Image channels.
        n_classes: Output classes (background included).
        feature_scale: Divides the base filters (64, 128, 256, 512, 1024); 4 is the paper's CT setting.
        gate_init: ``"pass-through"`` sets ψ so that α ≈ 0.95 at start (paper text); ``"released"`` keeps the
            official code's kaiming-initialised ψ (α ≈ 0.3-0.7 at start).
        norm: ``"batch"`` (the paper), or ``"group"`` / ``"instance"`` in place of every BatchNorm3d.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 5,
        feature_scale: int = 4,
        gate_init: GateInit = "pass-through",
        norm: Norm = "batch",
    ) -> None:
        super().__init__(in_channels, n_classes, feature_scale, norm)
        if gate_init not in ("pass-through", "released"):
            raise ValueError(f"gate_init must be 'pass-through' or 'released', got {gate_init!r}")
        f = self.filters
        self.gating = UnetGridGatingSignal3(f[4], f[4], norm)
        self.attentionblock2 = MultiAttentionBlock(f[1], f[2], norm)
        self.attentionblock3 = MultiAttentionBlock(f[2], f[3], norm)
        self.attentionblock4 = MultiAttentionBlock(f[3], f[4], norm)
        init_weights(self)
        if gate_init == "pass-through":
            for m in self.modules():
                if isinstance(m, GridAttentionBlock3D):
                    m.init_pass_through()

    def forward(self, x: Tensor) -> Tensor:
        """Segment a batch.

        Args:
            x: Images (B, in_channels, D, H, W); D, H and W multiples of 16.

        Returns:
            Logits (B, n_classes, D, H, W).

        Raises:
            ValueError: Wrong channel count or a side that is not a multiple of 16.
        """
        return self._run(x)[0]

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Segment a batch and return the attention coefficients for inspection or export.

        Args:
            x: Images (B, in_channels, D, H, W); D, H and W multiples of 16.

        Returns:
            Logits (B, n_classes, D, H, W) and α maps ``"att2"``, ``"att3"``, ``"att4"`` (gates of conv2, conv3,
            conv4), each (B, 2, D, H, W): the two sub-gates, trilinearly upsampled to the input size.
        """
        logits, maps = self._run(x)
        size = x.shape[2:]
        return logits, {
            name: F.interpolate(alpha, size=size, mode="trilinear", align_corners=False) for name, alpha in maps.items()
        }

    def _run(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._check_input(x)
        conv1, conv2, conv3, conv4, center = self._encode(x)
        g_conv4, att4 = self.attentionblock4(conv4, self.gating(center))
        up4 = self.up_concat4(g_conv4, center)
        g_conv3, att3 = self.attentionblock3(conv3, up4)
        up3 = self.up_concat3(g_conv3, up4)
        g_conv2, att2 = self.attentionblock2(conv2, up3)
        up2 = self.up_concat2(g_conv2, up3)
        up1 = self.up_concat1(conv1, up2)
        return self._fuse_heads(up4, up3, up2, up1), {"att2": att2, "att3": att3, "att4": att4}


class UNet3D(_DsvUNetBase):
    """The paper's U-Net baseline: the same network without the gating conv and attention blocks.

    Args:
        in_channels: Image channels.
        n_classes: Output classes (background included).
        feature_scale: Divides the base filters (64, 128, 256, 512, 1024); 4 is the paper's CT setting.
        norm: ``"batch"`` (the paper), or ``"group"`` / ``"instance"`` in place of every BatchNorm3d.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 5, feature_scale: int = 4, norm: Norm = "batch") -> None:
        super().__init__(in_channels, n_classes, feature_scale, norm)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Segment a batch.

        Args:
            x: Images (B, in_channels, D, H, W); D, H and W multiples of 16.

        Returns:
            Logits (B, n_classes, D, H, W).

        Raises:
            ValueError: Wrong channel count or a side that is not a multiple of 16.
        """
        self._check_input(x)
        conv1, conv2, conv3, conv4, center = self._encode(x)
        up4 = self.up_concat4(conv4, center)
        up3 = self.up_concat3(conv3, up4)
        up2 = self.up_concat2(conv2, up3)
        up1 = self.up_concat1(conv1, up2)
        return self._fuse_heads(up4, up3, up2, up1)


def build_model(cfg: ModelConfig) -> AttentionUNet3D | UNet3D:
    """Instantiate the network a validated config names (initialised from the global torch RNG)."""
    if cfg.arch == "attention-unet":
        return AttentionUNet3D(cfg.in_channels, cfg.n_classes, cfg.feature_scale, cfg.gate_init, cfg.norm)
    return UNet3D(cfg.in_channels, cfg.n_classes, cfg.feature_scale, cfg.norm)
