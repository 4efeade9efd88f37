"""Whole-volume sliding-window inference with Gaussian blending, for probabilities, labels and attention maps."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval, sliding_window_inference
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from fedseg.common.console import console
from fedseg.common.data.io import Volume
from fedseg.common.data.manifest import default_manifest
from fedseg.common.data.preprocess import PreparedCase, preprocess_case, restore_to_source
from fedseg.common.engine.checkpoint import CheckpointMeta
from fedseg.common.engine.device import CpuBf16, autocast_active, autocast_for
from fedseg.common.nn.model import SIZE_MULTIPLE

log = logging.getLogger(__name__)


#: A sliding window's progress bar: windows done of all, time so far and time left.
PROGRESS_COLUMNS = (
    TextColumn("{task.description}"),
    BarColumn(bar_width=30),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    TextColumn("left"),
    TimeRemainingColumn(),
)


def gate_maps(attention: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Average each gate's sub-gate maps into one α map per scale.

    Args:
        attention: gate name -> α, shape (K, z, y, x) (K sub-gates) or (z, y, x).

    Returns:
        gate name -> α, shape (z, y, x), float32 in [0, 1].
    """
    return {
        name: (alpha.mean(axis=0) if alpha.ndim == 4 else alpha).astype(np.float32) for name, alpha in attention.items()
    }


@dataclass(frozen=True)
class Prediction:
    """A whole-volume prediction on the prepared (z, y, x) grid.

    Attributes:
        probabilities: softmax probabilities, shape (C, z, y, x), float32, blended over windows.
        labels: argmax of ``probabilities``, shape (z, y, x), uint8.
        attention: gate name ("att2", "att3", "att4") -> attention coefficients α, shape (K, z, y, x), float32,
            blended like the probabilities (K sub-gates per scale); empty unless attention was requested.
    """

    probabilities: np.ndarray
    labels: np.ndarray
    attention: dict[str, np.ndarray]


def window_size(shape: tuple[int, ...], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """The window used for a volume: the patch, shrunk per axis to the volume side rounded up to a multiple of 16.

    Args:
        shape: volume shape (z, y, x).
        patch: training patch (D, H, W); every side must be a multiple of 16.

    Returns:
        (D, H, W) window, each side a multiple of 16 and at most the patch side.

    Raises:
        ValueError: a patch side is not a positive multiple of 16, or ``shape`` is not 3-D.
    """
    if len(shape) != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {shape}")
    if any(p <= 0 or p % SIZE_MULTIPLE for p in patch):
        raise ValueError(f"patch sides must be positive multiples of {SIZE_MULTIPLE}, got {patch}")
    sides = (min(p, SIZE_MULTIPLE * math.ceil(s / SIZE_MULTIPLE)) for p, s in zip(patch, shape, strict=True))
    d, h, w = sides
    return d, h, w


def window_count(shape: tuple[int, ...], patch: tuple[int, int, int], overlap: float) -> int:
    """How many windows MONAI's sliding window visits on a volume of ``shape`` (for progress): its own scan grid."""
    roi = window_size(shape, patch)
    size = [max(s, r) for s, r in zip(shape, roi, strict=True)]  # it pads a volume smaller than the window
    return len(dense_patch_slices(size, roi, _get_scan_interval(size, roi, 3, (overlap,) * 3)))


def _predictor(
    model: nn.Module, attention: bool, done: Callable[[int], None] | None = None
) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Wrap the model so each window yields float32 softmax probabilities (and α maps) for blending; ``done`` is
    told how many windows each call computed."""
    forward_with_attention = getattr(model, "forward_with_attention", None)
    if attention and not callable(forward_with_attention):
        raise ValueError(f"{type(model).__name__} has no attention gates; predict without attention")

    def run(window: torch.Tensor) -> dict[str, torch.Tensor]:
        # channels_last_3d makes oneDNN / cuDNN 3-D convolutions several times faster (CPU measured 1.2-4x).
        window = window.contiguous(memory_format=torch.channels_last_3d)
        if attention:
            logits, maps = forward_with_attention(window)  # type: ignore[misc]
            out = {name: alpha.float() for name, alpha in maps.items()}
        else:
            logits, out = model(window), {}
        out["probabilities"] = torch.softmax(logits.float(), dim=1)
        if done is not None:
            done(window.shape[0])
        return out

    return run


#: Flips (axes of the (z, y, x) volume) averaged by test-time augmentation: the in-plane flips training applies.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (1,), (2,), (1, 2))


def sliding_window_predict(
    model: nn.Module,
    image: np.ndarray,
    patch: tuple[int, int, int],
    device: torch.device | str,
    *,
    overlap: float = 0.5,
    attention: bool = False,
    sw_batch_size: int = 2,
    amp: bool = True,
    tta: bool = False,
    cpu_bf16: CpuBf16 = "auto",
    progress: bool = False,
) -> Prediction:
    """Predict a whole prepared volume with overlapping Gaussian-weighted windows.

    Volumes smaller than the window are padded (with the volume minimum, i.e. air) up to a multiple of 16
    and the result is cropped back, so the output always has the input's shape.

    Args:
        model: a segmentation network mapping (B, 1, D, H, W) to logits (B, C, D, H, W).
        image: normalised intensities on the prepared grid, shape (z, y, x).
        patch: window size (D, H, W), multiples of 16, usually the training patch.
        device: where the network runs; the blended output is accumulated on the CPU.
        overlap: fraction of overlap between neighbouring windows.
        attention: also blend the attention maps of ``model.forward_with_attention``.
        sw_batch_size: windows per forward pass.
        amp: bf16 autocast on CUDA, and on the CPU as ``cpu_bf16`` says.
        tta: test-time augmentation: average the outputs over the :data:`TTA_FLIPS` mirrorings (4x the time).
        cpu_bf16: bf16 autocast on the CPU: ``auto`` (on where the CPU has native bf16), True or False.
        progress: show a progress bar of the windows (with rate and time left) on the console.

    Returns:
        The blended :class:`Prediction` with the input's (z, y, x) shape.
    """
    device = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    flips = TTA_FLIPS if tta else ((),)
    was_training = model.training
    model.eval()
    windows = window_count(tuple(image.shape), patch, overlap) * len(flips)
    bar = Progress(*PROGRESS_COLUMNS, console=console, transient=True, disable=not progress)
    task = bar.add_task("predicting", total=windows)
    try:
        total: dict[str, torch.Tensor] = {}
        with bar:
            for axes in flips:
                dims = [axis + 2 for axis in axes]  # (batch, channel, z, y, x)
                window_input = torch.flip(x, dims) if dims else x
                for name, value in _blend(
                    model,
                    window_input,
                    patch,
                    device,
                    overlap,
                    attention,
                    sw_batch_size,
                    (amp, cpu_bf16),
                    lambda n: bar.advance(task, n),
                ):
                    value = torch.flip(value, dims) if dims else value
                    total[name] = total[name] + value if name in total else value
    finally:
        model.train(was_training)
    blended = {name: value / len(flips) for name, value in total.items()}
    probabilities = blended.pop("probabilities")[0].float().numpy()
    labels = probabilities.argmax(axis=0).astype(np.uint8)
    maps = {name: alpha[0].float().numpy() for name, alpha in sorted(blended.items())}
    return Prediction(probabilities=probabilities, labels=labels, attention=maps)


def _blend(
    model: nn.Module,
    x: torch.Tensor,
    patch: tuple[int, int, int],
    device: torch.device,
    overlap: float,
    attention: bool,
    sw_batch_size: int,
    amp: tuple[bool, CpuBf16],
    done: Callable[[int], None] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """MONAI's Gaussian-weighted sliding window over ``x`` (1, 1, z, y, x): (name, blended (1, C, z, y, x)).

    A bf16 result that is not finite is computed again in fp32 (see :mod:`fedseg.common.engine.step` for why).
    """
    out: list[tuple[str, torch.Tensor]] = []
    for precision in (amp, (False, False)):
        with torch.inference_mode(), autocast_for(device, *precision):
            blended = sliding_window_inference(
                x,
                roi_size=window_size(tuple(x.shape[2:]), patch),
                sw_batch_size=sw_batch_size,
                predictor=_predictor(model, attention, done),
                overlap=overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=float(x.min()),
                sw_device=device,
                device=torch.device("cpu"),
            )
        assert isinstance(blended, dict)  # our predictor always returns a dict
        out = [(name, value.float()) for name, value in blended.items()]
        if not autocast_active(device, *precision) or all(bool(torch.isfinite(v).all()) for _, v in out):
            break
        log.warning("inference was not finite in bf16; computed again in fp32")
    return out


@dataclass(frozen=True)
class VolumePrediction:
    """A prediction mapped back onto the input volume's exact grid (shape, spacing, origin, direction).

    Attributes:
        labels: class index per voxel, uint8.
        probabilities: class name -> probability volume (float32); empty unless requested.
        attention: gate name -> α averaged over its sub-gates (float32); empty unless requested.
    """

    labels: Volume
    probabilities: dict[str, Volume]
    attention: dict[str, Volume]


def predict_volume(
    model: nn.Module,
    meta: CheckpointMeta,
    volume: Volume,
    device: torch.device | str,
    *,
    attention: bool = False,
    probabilities: bool = False,
    overlap: float = 0.5,
    tta: bool = False,
    progress: bool = False,
) -> VolumePrediction:
    """Preprocess a CT as in training, predict it whole, and resample the results to its own geometry.

    Args:
        model: the network from :func:`fedseg.common.engine.checkpoint.load_checkpoint`.
        meta: that checkpoint's metadata (preprocessing, patch size, class names).
        volume: the input CT in Hounsfield units.
        device: where the network runs.
        attention: also return the attention maps (Attention U-Net only).
        probabilities: also return one probability volume per class.
        overlap: sliding-window overlap.
        tta: average over the in-plane mirrorings (see :func:`sliding_window_predict`).
        progress: show the sliding window's progress bar.

    Returns:
        The :class:`VolumePrediction` on ``volume``'s grid.

    Under ``normalization = "site"`` one volume has no site to pool with: it is z-scored with its own body
    statistics (one log line says so), which is what a site whose cases share one scanner calibration gives.
    """
    if meta.preprocess.normalization == "site":
        log.info("normalization 'site': one volume alone is z-scored with its own body statistics")
    case = preprocess_case(volume, None, default_manifest(), meta.preprocess)
    windows = window_count(case.image.shape, meta.patch_size, overlap) * (len(TTA_FLIPS) if tta else 1)
    log.info("predicting a %s volume (%s prepared) in %d windows", volume.array.shape, case.image.shape, windows)
    pred = sliding_window_predict(
        model, case.image, meta.patch_size, device, overlap=overlap, attention=attention, tta=tta, progress=progress
    )
    restored = restore_to_source(pred.labels, case, is_label=True)
    labels = restored.with_array(restored.array.astype(np.uint8))
    probs = {}
    if probabilities:
        for index, name in enumerate(meta.class_names):
            probs[name] = _restore_float(pred.probabilities[index], case)
    maps = {name: _restore_float(alpha, case) for name, alpha in gate_maps(pred.attention).items()}
    return VolumePrediction(labels=labels, probabilities=probs, attention=maps)


def _restore_float(array: np.ndarray, case: PreparedCase) -> Volume:
    restored = restore_to_source(array, case, is_label=False)
    return restored.with_array(np.clip(restored.array, 0.0, 1.0).astype(np.float32))
