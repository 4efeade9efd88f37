"""The bundle's ``configs/metadata.json``: the MONAI Bundle specification's fields, from the checkpoint."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import monai
import numpy as np
import torch

from fedseg.common.engine.checkpoint import CheckpointMeta
from fedseg.common.nn.model import SIZE_MULTIPLE

#: The JSON schema MONAI's ``verify_metadata`` checks bundles against.
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_VERSION = "1.0.0"
#: The network's spatial sides, as the specification writes a constraint: each a multiple of 16.
SPATIAL_SHAPE = [f"{SIZE_MULTIPLE}*n", f"{SIZE_MULTIPLE}*m", f"{SIZE_MULTIPLE}*p"]
REFERENCE = (
    "Oktay O, Schlemper J, Le Folgoc L, et al. Attention U-Net: Learning Where to Look for the Pancreas. "
    "MIDL 2018. https://arxiv.org/abs/1804.03999"
)
#: Distributions ``python -m monai.bundle run`` needs besides MONAI, torch and numpy.
RUN_PACKAGES = ("nibabel", "pytorch-ignite", "fire")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "any"


def _classes(meta: CheckpointMeta) -> str:
    return ", ".join(f"{i} {name}" for i, name in enumerate(meta.class_names))


def network_data_format(meta: CheckpointMeta) -> dict[str, Any]:
    """The network's input and output tensors (axes z, y, x: the configs transpose MONAI's x, y, z)."""
    cfg = meta.preprocess
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "CT",
                "num_channels": meta.model.in_channels,
                "spatial_shape": SPATIAL_SHAPE,
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": True,
                "channel_def": {
                    "0": f"CT clipped to [{cfg.hu_window[0]:g}, {cfg.hu_window[1]:g}] HU and z-scored "
                    f"({cfg.normalization} statistics), axes z, y, x"
                },
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "labels",
                "num_channels": meta.model.n_classes,
                "spatial_shape": SPATIAL_SHAPE,
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": True,
                "channel_def": {str(i): name for i, name in enumerate(meta.class_names)},
            }
        },
    }


def metadata(meta: CheckpointMeta, source: str) -> dict[str, Any]:
    """The whole ``metadata.json`` for a bundle exported from the checkpoint named ``source``."""
    trained = f"round {meta.round}" if meta.round is not None else f"epoch {meta.epoch}"
    return {
        "schema": SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by fedseg {meta.fedseg_version} from {source} ({trained})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {name: _version(name) for name in RUN_PACKAGES},
        "optional_packages_version": {},
        "name": "fedseg Attention U-Net, abdominal CT",
        "task": "Segmentation of " + ", ".join(meta.class_names[1:]) + " in abdominal CT",
        "description": f"3D {meta.model.arch} (feature scale {meta.model.feature_scale}) trained with fedseg, "
        "federated across hospital sites; the TorchScript network takes the prepared CT in z, y, x order.",
        "authors": "the sites of the federation that trained it; exported with fedseg",
        "copyright": "the federation that trained it",
        "data_source": "CT of the federation's sites (the images never left the sites)",
        "data_type": "nifti",
        "image_classes": "single-channel CT in Hounsfield units",
        "label_classes": f"single channel: {_classes(meta)}",
        "pred_classes": f"{meta.model.n_classes} channels of logits ({_classes(meta)}); the workflow writes their "
        "argmax as a label map",
        "eval_metrics": dict(meta.metrics),
        "intended_use": "Research use only; not a medical device.",
        "references": [REFERENCE],
        "network_data_format": network_data_format(meta),
        "fedseg": {"config_hash": meta.config_hash, "patch_size": list(meta.patch_size)},
    }
