"""Building blocks of the released 3D Attention U-Net (Oktay et al. 2018, ``unet_CT_multi_att_dsv_3D``).

Attribute names mirror the official code (``conv1``, ``W``, ``theta``, ``phi``, ``psi``, ``gate_block_1``,
``combine_gates``, ``dsv`` ...) so that a state dict of the released model loads into these modules unchanged.
The architecture is specified in ``shared/design/attention-unet.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Pass-through gate initialisation (paper §2.3, "AGs pass features at all spatial locations"): sigmoid(3) = 0.95.
PASS_THROUGH_PSI_BIAS = 3.0
#: ψ weights shrink by this factor so ψᵀf stays small next to the bias: α in [0.94, 0.97] at init (kaiming alone
#: gives 0.55-0.99), while θ and φ still receive gradient through ψ.
PASS_THROUGH_PSI_WEIGHT_SCALE = 0.1


#: The normalisation after every convolution: the paper's BatchNorm, or a per-case one (needed by DP-SGD, whose
#: per-case gradients cannot pass through statistics shared by the batch).
Norm = Literal["batch", "group", "instance"]
NORMS: tuple[Norm, ...] = ("batch", "group", "instance")
#: GroupNorm: at most this many groups, and at least :data:`MIN_GROUP_WIDTH` channels in each.
MAX_GROUPS = 8
MIN_GROUP_WIDTH = 2


def group_count(channels: int) -> int:
    """GroupNorm's groups for ``channels``: the largest divisor of ``channels`` that is at most :data:`MAX_GROUPS`
    and leaves every group :data:`MIN_GROUP_WIDTH` channels or more; 1 (one group, layer-norm-like) when none does.

    Valid for every channel count the model has at any feature scale (1 to 1024 channels, odd ones included:
    feature scale 3 gives 21, 42, 85, 170 and 341).
    """
    if channels < 1:
        raise ValueError(f"a normalisation needs at least one channel, got {channels}")
    limit = min(MAX_GROUPS, channels // MIN_GROUP_WIDTH)
    return next((g for g in range(limit, 1, -1) if channels % g == 0), 1)


def norm_layer(norm: Norm, channels: int) -> nn.Module:
    """The normalisation ``norm`` over ``channels`` channels, each with an affine γ/β (same parameter count)."""
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def relu_for(norm: Norm) -> nn.ReLU:
    """The activation after a ``norm`` layer: in place only after BatchNorm (the paper's memory saving).

    A per-case norm is what DP-SGD trains, and Opacus's hooks hand the norm's output on as a view that must not be
    modified in place. Out of place computes the same values and gradients; it only keeps one more tensor.
    """
    return nn.ReLU(inplace=norm == "batch")


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, padding: int, norm: Norm = "batch"
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size, stride=1, padding=padding),
        norm_layer(norm, out_channels),
        relu_for(norm),
    )


class UnetConv3(nn.Module):
    """Double convolution: two times (Conv3d 3×3×3 pad 1 with bias → BatchNorm3d → ReLU).

    Args:
        in_channels: Input channels.
        out_channels: Output channels of both convolutions.
        norm: The normalisation in place of BatchNorm3d (:func:`norm_layer`).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch") -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, out_channels, kernel_size=3, padding=1, norm=norm)
        self.conv2 = _conv_bn_relu(out_channels, out_channels, kernel_size=3, padding=1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, C_in, D, H, W) to (B, C_out, D, H, W)."""
        out: Tensor = self.conv2(self.conv1(x))
        return out


class UnetGridGatingSignal3(nn.Module):
    """Gating signal on the bottleneck: Conv3d 1×1×1 (with bias) → BatchNorm3d (or ``norm``) → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch") -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, out_channels, kernel_size=1, padding=0, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, C_in, D, H, W) to (B, C_out, D, H, W)."""
        out: Tensor = self.conv1(x)
        return out


class GridAttentionBlock3D(nn.Module):
    """Additive grid attention gate (mode ``concatenation``) with a sigmoid and ×2 trilinear resampling of α.

    ``α = up₂(σ(ψᵀ ReLU(W_x ∗₂ x + W_g g + b_g) + b_ψ))`` and the output is ``BN(W(α ⊙ x))``.

    Args:
        in_channels: Channels C_x of the skip x; also the intermediate width F_int (as released).
        gating_channels: Channels C_g of the gating signal g, which lives on x's grid halved.
        norm: The normalisation in place of BN (:func:`norm_layer`).
    """

    def __init__(self, in_channels: int, gating_channels: int, norm: Norm = "batch") -> None:
        super().__init__()
        inter_channels = in_channels
        self.W = nn.Sequential(nn.Conv3d(in_channels, in_channels, kernel_size=1), norm_layer(norm, in_channels))
        self.theta = nn.Conv3d(in_channels, inter_channels, kernel_size=2, stride=2, bias=False)
        self.phi = nn.Conv3d(gating_channels, inter_channels, kernel_size=1, bias=True)
        self.psi = nn.Conv3d(inter_channels, 1, kernel_size=1, bias=True)

    def forward(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Gate the skip.

        Args:
            x: Skip features (B, C_x, D, H, W).
            g: Gating signal (B, C_g, D/2, H/2, W/2).

        Returns:
            The gated, transformed skip (B, C_x, D, H, W) and α (B, 1, D, H, W) in [0, 1].
        """
        theta_x = self.theta(x)
        phi_g = self.phi(g)
        if phi_g.shape[2:] != theta_x.shape[2:]:
            phi_g = F.interpolate(phi_g, size=theta_x.shape[2:], mode="trilinear", align_corners=False)
        f = F.relu(theta_x + phi_g, inplace=True)
        alpha = torch.sigmoid(self.psi(f))
        alpha = F.interpolate(alpha, size=x.shape[2:], mode="trilinear", align_corners=False)
        out: Tensor = self.W(alpha * x)
        return out, alpha

    @torch.no_grad()
    def init_pass_through(self) -> None:
        """Set ψ so that α ≈ σ(3) = 0.95 at every location (the paper's initialisation, not the released one)."""
        self.psi.weight.mul_(PASS_THROUGH_PSI_WEIGHT_SCALE)
        if self.psi.bias is None:
            raise TypeError("psi must have a bias")
        self.psi.bias.fill_(PASS_THROUGH_PSI_BIAS)


class MultiAttentionBlock(nn.Module):
    """Two independent grid gates on the same (x, g), fused by Conv3d 1×1×1 (2C_x → C_x) → BN → ReLU.

    Args:
        in_channels: Channels C_x of the skip.
        gating_channels: Channels C_g of the gating signal.
        norm: The normalisation in place of BN (:func:`norm_layer`).
    """

    def __init__(self, in_channels: int, gating_channels: int, norm: Norm = "batch") -> None:
        super().__init__()
        self.gate_block_1 = GridAttentionBlock3D(in_channels, gating_channels, norm)
        self.gate_block_2 = GridAttentionBlock3D(in_channels, gating_channels, norm)
        self.combine_gates = _conv_bn_relu(2 * in_channels, in_channels, kernel_size=1, padding=0, norm=norm)

    def forward(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Gate x (B, C_x, D, H, W) with g (B, C_g, D/2, H/2, W/2); return (B, C_x, D, H, W) and α (B, 2, D, H, W)."""
        gated_1, alpha_1 = self.gate_block_1(x, g)
        gated_2, alpha_2 = self.gate_block_2(x, g)
        out: Tensor = self.combine_gates(torch.cat([gated_1, gated_2], dim=1))
        return out, torch.cat([alpha_1, alpha_2], dim=1)


class UnetUp3CT(nn.Module):
    """Decoder level: parameter-free trilinear ×2 of the coarse tensor, concat [skip, up], double conv.

    Args:
        in_channels: Channels of the coarse decoder tensor.
        out_channels: Channels of the skip and of the output.
        norm: The normalisation of the double conv (:func:`norm_layer`).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch") -> None:
        super().__init__()
        self.conv = UnetConv3(in_channels + out_channels, out_channels, norm)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)

    def forward(self, skip: Tensor, coarse: Tensor) -> Tensor:
        """Fuse skip (B, C_out, D, H, W) with coarse (B, C_in, D/2, H/2, W/2) into (B, C_out, D, H, W)."""
        out: Tensor = self.conv(torch.cat([skip, self.up(coarse)], dim=1))
        return out


class UnetDsv3(nn.Module):
    """Deep-supervision head: Conv3d 1×1×1 to the classes, then trilinear upsampling by ``scale_factor``."""

    def __init__(self, in_channels: int, n_classes: int, scale_factor: int) -> None:
        super().__init__()
        self.dsv = nn.Sequential(
            nn.Conv3d(in_channels, n_classes, kernel_size=1),
            nn.Upsample(scale_factor=scale_factor, mode="trilinear", align_corners=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, C, D, H, W) to (B, n_classes, s·D, s·H, s·W)."""
        out: Tensor = self.dsv(x)
        return out


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """Released initialisation: kaiming-normal (a=0, fan_in) Conv3d weights, BN γ ~ N(1, 0.02) and β = 0.

    Conv biases keep PyTorch's default uniform initialisation, as in the released code. GroupNorm and InstanceNorm
    (``norm`` other than batch) get BN's γ and β.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
        elif isinstance(m, nn.BatchNorm3d | nn.GroupNorm | nn.InstanceNorm3d) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
