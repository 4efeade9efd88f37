"""The bundle's ``configs/inference.json``: fedseg's preprocessing, window and restoration as a MONAI workflow.

Step by step, next to what fedseg does (:mod:`fedseg.common.data.preprocess`, :mod:`fedseg.common.engine.inference`):

1. ``LoadImaged`` + ``EnsureChannelFirstd``: the NIfTI, channel first, MONAI's (x, y, z) axes.
2. ``Orientationd`` to the checkpoint's code (ITK's DICOMOrient and nibabel read the three letters alike).
3. ``CentredSpacingd`` (the bundle's script): anti-aliasing and resampling onto fedseg's centred grid.
4. Intensity: ``normalization = "volume"`` is ``ScaleIntensityRanged`` (clip to the HU window) then
   ``NormalizeIntensityd`` (z-score over the volume); ``"body"`` / ``"site"`` is the script's ``BodyZScored``.
5. ``Transposed`` to (z, y, x), the network's axis order.
6. The network is ``models/model.ts`` followed by a softmax, so windows blend probabilities as in fedseg;
   ``FittedWindowInferer`` (the script) is MONAI's Gaussian sliding window with fedseg's window and padding.
7. ``AsDiscreted`` (argmax), ``Invertd`` back to the input's exact grid (nearest neighbour), ``SaveImaged`` as
   ``<case>_seg.nii.gz`` (uint8), like ``fed-eval predict``.
"""

from __future__ import annotations

from typing import Any

from fedseg.common.engine.checkpoint import CheckpointMeta
from fedseg.common.export.contract import OVERLAP

#: Where the bundle's script module lives (``scripts/fedseg_transforms.py``) and how the configs name it.
SCRIPT_MODULE = "scripts.fedseg_transforms"
#: What the orientation letters mean in MONAI's (RAS) world: its current default, spelled out (it is to change).
AXIS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]
#: Windows per forward pass (``fed-eval predict`` uses 2 as well).
SW_BATCH_SIZE = 2


def _intensity(meta: CheckpointMeta) -> list[dict[str, Any]]:
    cfg = meta.preprocess
    if cfg.normalization == "volume":
        return [
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": "$@hu_window[0]",
                "a_max": "$@hu_window[1]",
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            {"_target_": "NormalizeIntensityd", "keys": "image"},
        ]
    return [
        {
            "_target_": f"{SCRIPT_MODULE}.BodyZScored",
            "keys": "image",
            "window": "@hu_window",
            "threshold": cfg.body_threshold_hu,
        }
    ]


def preprocessing(meta: CheckpointMeta) -> dict[str, Any]:
    """The ``preprocessing`` Compose (steps 1-5 of the module docstring)."""
    cfg = meta.preprocess
    mode: str | int = "bilinear" if cfg.interpolation == "linear" else 3
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True, "reader": "NibabelReader"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "@orientation", "labels": AXIS_LABELS},
            {
                "_target_": f"{SCRIPT_MODULE}.CentredSpacingd",
                "keys": "image",
                "pixdim": "$@target_spacing_zyx[::-1]",
                "mode": mode,
                "antialias": cfg.antialias,
            },
            *_intensity(meta),
            {"_target_": "Transposed", "keys": "image", "indices": [0, 3, 2, 1]},
        ],
    }


def postprocessing() -> dict[str, Any]:
    """Argmax, back to the input's grid, written as ``<case>_seg.nii.gz``."""
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "nearest_interp": True,
                "to_tensor": True,
            },
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_postfix": "seg",
                "output_ext": ".nii.gz",
                "output_dtype": "$numpy.uint8",
                "resample": False,
                "separate_folder": False,
                "writer": "NibabelWriter",
                "print_log": False,
            },
        ],
    }


def inference_config(meta: CheckpointMeta) -> dict[str, Any]:
    """The whole ``inference.json``; ``--input_dir``, ``--output_dir`` and ``--device`` override its defaults."""
    cfg = meta.preprocess
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "input_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "orientation": cfg.orientation,
        "target_spacing_zyx": list(cfg.target_spacing),
        "hu_window": list(cfg.hu_window),
        "patch_size": list(meta.patch_size),
        "overlap": OVERLAP,
        "sw_batch_size": SW_BATCH_SIZE,
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@input_dir, '*.nii*')))]",
        "network": "$torch.nn.Sequential(torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), "
        "map_location=@device), torch.nn.Softmax(dim=1)).to(@device).eval()",
        "preprocessing": preprocessing(meta),
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": f"{SCRIPT_MODULE}.FittedWindowInferer",
            "roi_size": "@patch_size",
            "sw_batch_size": "@sw_batch_size",
            "overlap": "@overlap",
        },
        "postprocessing": postprocessing(),
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "amp": False,
        },
        "run": ["$@evaluator.run()"],
    }
