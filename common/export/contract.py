"""The contract written beside every exported model (``model.json``): its tensors and the preprocessing it expects.

A runtime that is not fedseg has to reproduce what :func:`fedseg.common.data.preprocess.preprocess_case` does
before the network and what :func:`fedseg.common.engine.inference.sliding_window_predict` does around it; this
file says exactly that, from the checkpoint's own :class:`~fedseg.common.data.preprocess.PreprocessConfig`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fedseg.common.engine.checkpoint import CheckpointMeta
from fedseg.common.nn.model import SIZE_MULTIPLE

CONTRACT_FORMAT = "fedseg-export"
CONTRACT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: The sliding-window overlap fedseg predicts with (:func:`~fedseg.common.engine.inference.predict_volume`).
OVERLAP = 0.5


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors(meta: CheckpointMeta) -> dict[str, Any]:
    """The network's input and output: names, shapes (symbolic axes) and meaning."""
    spatial = [f"{SIZE_MULTIPLE}*d", f"{SIZE_MULTIPLE}*h", f"{SIZE_MULTIPLE}*w"]
    return {
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", meta.model.in_channels, *spatial],
            "dtype": "float32",
            "axes": "batch, channel, z, y, x (slices, rows, columns of the prepared volume)",
            "spatial_multiple": SIZE_MULTIPLE,
            "values": "the prepared CT: preprocessing below (z-scored, about -3 to +3)",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", meta.model.n_classes, *spatial],
            "dtype": "float32",
            "values": "logits; softmax over the channel axis gives the class probabilities",
            "classes": dict(enumerate(meta.class_names)),
        },
    }


def preprocessing(meta: CheckpointMeta) -> dict[str, Any]:
    """What happens between a CT in HU and the network's input, in the order fedseg does it."""
    cfg = meta.preprocess
    region = {
        "volume": "every voxel of the prepared volume",
        "body": f"the voxels above {cfg.body_threshold_hu:g} HU before clipping",
        "site": f"the voxels above {cfg.body_threshold_hu:g} HU before clipping (one volume alone; in training the "
        "site's cases pooled)",
    }[cfg.normalization]
    return {
        "orientation": cfg.orientation,
        "orientation_meaning": "ITK/DICOM code: the x, y, z index axes point towards these patient directions "
        "(LPS = identity direction cosines); arrays are then indexed z, y, x",
        "target_spacing_mm": {"z": cfg.target_spacing[0], "y": cfg.target_spacing[1], "x": cfg.target_spacing[2]},
        "grid": "round(n * spacing / target) voxels per axis, centred on the source's physical box, same directions",
        "interpolation": cfg.interpolation,
        "antialias": "discrete Gaussian, sigma = (target - source) / 2 mm on downsampled axes, before resampling"
        if cfg.antialias
        else "none",
        "hu_window": list(cfg.hu_window),
        "normalization": cfg.normalization,
        "z_score": f"(clip(HU, {cfg.hu_window[0]:g}, {cfg.hu_window[1]:g}) - mean) / sd over {region} "
        "(population sd, at least 1e-6)",
    }


def inference(meta: CheckpointMeta) -> dict[str, Any]:
    """How fedseg runs the network over a whole prepared volume and maps the result back."""
    return {
        "window": list(meta.patch_size),
        "window_rule": f"per axis min(window, volume side rounded up to a multiple of {SIZE_MULTIPLE})",
        "overlap": OVERLAP,
        "blending": "MONAI sliding_window_inference, Gaussian weights (sigma_scale 0.125) over the softmax "
        "probabilities of each window",
        "padding": "a volume smaller than the window is padded (centred) with its minimum",
        "labels": "argmax of the blended probabilities, resampled to the source grid by nearest neighbour",
    }


def contract(meta: CheckpointMeta, checkpoint: Path, model_file: str, **extra: Any) -> dict[str, Any]:
    """The whole ``model.json`` for ``model_file`` exported from ``checkpoint``."""
    return {
        "format": CONTRACT_FORMAT,
        "format_version": CONTRACT_VERSION,
        "model_file": model_file,
        **extra,
        "model": {"arch": meta.model.arch, "feature_scale": meta.model.feature_scale, "norm": meta.model.norm},
        **tensors(meta),
        "preprocessing": preprocessing(meta),
        "inference": inference(meta),
        "source": {
            "checkpoint": checkpoint.name,
            "sha256": sha256_of(checkpoint),
            "config_hash": meta.config_hash,
            "fedseg_version": meta.fedseg_version,
            "round": meta.round,
            "epoch": meta.epoch,
            "metrics": meta.metrics,
        },
    }
