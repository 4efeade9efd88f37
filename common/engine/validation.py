"""Whole-volume validation: sliding-window prediction of each case, then mean Dice per foreground class."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedseg.common.data.manifest import GLOBAL_CLASSES
from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.engine.device import CpuBf16
from fedseg.common.engine.inference import sliding_window_predict
from fedseg.common.eval.metrics import dice_per_class

log = logging.getLogger(__name__)

#: Key of the mean foreground Dice in :func:`validate`'s result.
MEAN_KEY = "dice_mean"


def dice_key(class_name: str) -> str:
    """The result key of one class, e.g. ``dice_liver``."""
    return f"dice_{class_name}"


def class_names_for(n_classes: int) -> tuple[str, ...]:
    """The project's global class names when ``n_classes`` matches them, else ``background, class_1, ...``."""
    if n_classes == len(GLOBAL_CLASSES):
        return GLOBAL_CLASSES
    return ("background", *(f"class_{i}" for i in range(1, n_classes)))


def case_dice(pred: np.ndarray, case: PreparedCase, n_classes: int) -> np.ndarray:
    """Dice per class of one prediction against the case label; NaN where undefined or not annotated.

    Args:
        pred: predicted labels (z, y, x) on the prepared grid.
        case: the prepared case; must have a label.
        n_classes: number of classes, background included.

    Returns:
        (n_classes,) float array: NaN where the class is absent from both maps or the case's site does not
        annotate it (its voxels are background in that label, so no Dice can be scored).
    """
    if case.label is None:
        raise ValueError(f"case {case.case_id} has no label to validate against")
    dice = np.asarray(dice_per_class(pred, case.label, n_classes), dtype=np.float64)
    annotated = np.zeros(n_classes, dtype=bool)
    annotated[: len(case.annotated)] = case.annotated[:n_classes]
    dice[~annotated] = np.nan
    return dice


def validate(
    model: nn.Module,
    cases: Sequence[PreparedCase],
    patch: tuple[int, int, int],
    device: torch.device | str,
    class_names: Sequence[str] | None = None,
    cpu_bf16: CpuBf16 = "auto",
) -> dict[str, float]:
    """Mean Dice per foreground class over labelled cases, plus the mean over foreground classes.

    Args:
        model: the network (its train/eval mode is restored afterwards).
        cases: prepared cases; those without a label are skipped.
        patch: sliding-window size (D, H, W), multiples of 16.
        device: where the network runs.
        class_names: names of the model's classes, background first; default :func:`class_names_for`.
        cpu_bf16: bf16 autocast of the inference on the CPU (``auto``: where native), as in training.

    Returns:
        ``{"dice_<class>": mean over cases, ..., "dice_mean": mean over foreground classes}``. Each mean
        ignores NaN (class absent or not annotated); a class never scored is NaN.

    Raises:
        ValueError: no case has a label, or ``class_names`` does not match the model's class count.
    """
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise ValueError("validate needs at least one case with a label")
    scores = []
    for case in labelled:
        prediction = sliding_window_predict(model, case.image, patch, device, cpu_bf16=cpu_bf16)
        n_classes = prediction.probabilities.shape[0]
        scores.append(case_dice(prediction.labels, case, n_classes))
    names = tuple(class_names) if class_names is not None else class_names_for(n_classes)
    if len(names) != n_classes:
        raise ValueError(f"got {len(names)} class names for a model with {n_classes} classes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN columns are expected
        per_class = np.nanmean(np.stack(scores), axis=0)
        mean_fg = float(np.nanmean(per_class[1:])) if n_classes > 1 else float("nan")
    result = {dice_key(name): float(per_class[i]) for i, name in enumerate(names) if i > 0}
    result[MEAN_KEY] = mean_fg
    return result
