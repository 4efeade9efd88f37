"""Model cost at a given input size: parameters, forward FLOPs and training activation memory, without allocating.

Everything is measured on PyTorch's ``meta`` device, so a 160×160×96 summary takes seconds and no memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fedseg.common.nn.model import ModelConfig, build_model, check_spatial_size, count_parameters

#: Bytes per parameter held during Adam training in fp32: weight, gradient and the two moment estimates.
_ADAM_BYTES_PER_PARAM = 4 * 4


@dataclass(frozen=True)
class PartSummary:
    """Cost of one top-level block of the network (e.g. ``conv1``, ``attentionblock4``, ``up_concat1``)."""

    name: str
    params: int
    gflops: float


@dataclass(frozen=True)
class ModelSummary:
    """What a network costs at one input size (fp32, training-mode forward).

    Attributes:
        arch: ``"attention-unet"`` or ``"unet"``.
        input_shape: Full input shape (B, C, D, H, W).
        params: Parameter count (BN affine terms included, running statistics excluded).
        gflops: Forward conv/matmul GFLOPs (2 × MAC) counted by ``torch.utils.flop_counter.FlopCounterMode``.
        activation_bytes: Bytes of tensors saved for backward (parameters excluded, shared storages counted
            once), i.e. the activation memory a training step holds at its peak.
        param_state_bytes: Bytes of fp32 weights, gradients and Adam moments.
        parts: Per top-level block parameters and GFLOPs, in model order.
    """

    arch: str
    input_shape: tuple[int, int, int, int, int]
    params: int
    gflops: float
    activation_bytes: int
    param_state_bytes: int
    parts: tuple[PartSummary, ...] = field(default=())


def summarize(cfg: ModelConfig, input_size: tuple[int, int, int], batch_size: int = 1) -> ModelSummary:
    """Measure parameters, forward GFLOPs and saved-for-backward bytes of ``cfg``'s network.

    Args:
        cfg: The network to measure.
        input_size: Spatial input size (D, H, W), each side a multiple of 16.
        batch_size: Batch size B.

    Returns:
        The summary; e.g. 6,473,322 params, 346.65 GFLOPs and 2.98e9 activation bytes for the attention
        network with n_classes=4 at (160, 160, 96).

    Raises:
        ValueError: ``input_size`` is not three multiples of 16, or ``batch_size`` < 1.
    """
    check_spatial_size(input_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape = (batch_size, cfg.in_channels, *input_size)
    with torch.device("meta"):
        model = build_model(cfg)
        x = torch.empty(shape)
    model.train()
    params = count_parameters(model)
    flops, saved_bytes, order = _measure_forward(model, x)
    children = dict(model.named_children())
    parts = tuple(
        PartSummary(name, count_parameters(children[name]), flops.get(f"{type(model).__name__}.{name}", 0) / 1e9)
        for name in order
        if count_parameters(children[name]) > 0
    )
    return ModelSummary(
        arch=cfg.arch,
        input_shape=(shape[0], shape[1], shape[2], shape[3], shape[4]),
        params=params,
        gflops=flops["Global"] / 1e9,
        activation_bytes=saved_bytes,
        param_state_bytes=params * _ADAM_BYTES_PER_PARAM,
        parts=parts,
    )


def _measure_forward(model: nn.Module, x: Tensor) -> tuple[dict[str, int], int, list[str]]:
    """Run one forward.

    Returns:
        FLOPs per module name (``"Global"`` = total), saved-for-backward bytes, and the names of the top-level
        children in the order they first run.
    """
    order: list[str] = []

    def recorder(name: str) -> Callable[[nn.Module, tuple[object, ...]], None]:
        def hook(_module: nn.Module, _args: tuple[object, ...]) -> None:
            if name not in order:
                order.append(name)

        return hook

    handles = [child.register_forward_pre_hook(recorder(name)) for name, child in model.named_children()]
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    # Meta tensors have no data pointers, so storages are told apart by their C++ object; holding the tensors
    # keeps them alive, so no address is reused while counting.
    saved: dict[int, Tensor] = {}

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in param_storages:
            saved[key] = t
        return t

    def unpack(t: Tensor) -> Tensor:
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        model(x)
    for handle in handles:
        handle.remove()
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    flops.setdefault("Global", 0)
    return flops, sum(t.untyped_storage().nbytes() for t in saved.values()), order
