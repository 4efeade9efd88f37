"""Parity of an exported model with the PyTorch network: both run fedseg's own sliding window (fp32, CPU) over a
whole prepared CT, and their blended softmax probabilities and argmax labels are compared voxel by voxel."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedseg.common.engine.checkpoint import CheckpointMeta
from fedseg.common.engine.inference import sliding_window_predict

#: The parity an export must reach (issue 28): softmax max abs difference, argmax agreement.
MAX_ABS_DIFF = 1e-4
MIN_AGREEMENT = 0.9999


@dataclass(frozen=True)
class Parity:
    """How closely ``runtime`` reproduced PyTorch on one prepared volume.

    Attributes:
        runtime: what ran the export ("onnxruntime (CPU)", "TorchScript").
        shape: the prepared volume (z, y, x).
        max_abs_diff: largest absolute difference of the blended softmax probabilities.
        agreement: share of voxels whose argmax label is the same.
        torch_seconds: PyTorch's time for the whole sliding-window prediction.
        export_seconds: the export's time for it.
    """

    runtime: str
    shape: tuple[int, int, int]
    max_abs_diff: float
    agreement: float
    torch_seconds: float
    export_seconds: float

    @property
    def ok(self) -> bool:
        """Within :data:`MAX_ABS_DIFF` and :data:`MIN_AGREEMENT`."""
        return self.max_abs_diff <= MAX_ABS_DIFF and self.agreement >= MIN_AGREEMENT


def measure(model: nn.Module, exported: nn.Module, runtime: str, image: np.ndarray, meta: CheckpointMeta) -> Parity:
    """Predict the prepared ``image`` (z, y, x) with both modules over ``meta``'s window and compare."""
    device = torch.device("cpu")
    for module in (model, exported):
        _warm_up(module, meta.model.in_channels)
    start = time.perf_counter()
    reference = sliding_window_predict(model, image, meta.patch_size, device, amp=False)
    middle = time.perf_counter()
    candidate = sliding_window_predict(exported, image, meta.patch_size, device, amp=False)
    end = time.perf_counter()
    shape = image.shape
    return Parity(
        runtime=runtime,
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        max_abs_diff=float(np.abs(reference.probabilities - candidate.probabilities).max()),
        agreement=float(np.mean(reference.labels == candidate.labels)),
        torch_seconds=middle - start,
        export_seconds=end - middle,
    )


def _warm_up(module: nn.Module, channels: int) -> None:
    """One small forward pass, so neither timing includes the first call's one-off set-up."""
    with torch.inference_mode():
        module(torch.zeros(1, channels, 16, 16, 16))
