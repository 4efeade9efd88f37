"""The bundle's ``docs/README.md``: what the model segments, how to run it, what its preprocessing is."""

from __future__ import annotations

from collections.abc import Sequence

from fedseg.common.engine.checkpoint import CheckpointMeta


def _preprocessing(meta: CheckpointMeta) -> list[str]:
    cfg = meta.preprocess
    z, y, x = cfg.target_spacing
    stats = {"volume": "the whole resampled volume", "body": f"voxels above {cfg.body_threshold_hu:g} HU"}
    resample = f"resample ({cfg.interpolation}) to {x:g} x {y:g} x {z:g} mm (x, y, z) on a grid centred on the scan."
    if cfg.antialias:
        resample = "Smooth the downsampled axes (discrete Gaussian, sigma = (target - source) / 2 mm), " + resample
    return [
        f"1. Reorient to {cfg.orientation} (no interpolation).",
        f"2. {resample[0].upper()}{resample[1:]}",
        f"3. Clip to [{cfg.hu_window[0]:g}, {cfg.hu_window[1]:g}] HU and z-score with the mean and sd of "
        f"{stats.get(cfg.normalization, stats['body'])}.",
        f"4. Sliding window of {','.join(map(str, meta.patch_size))} (z, y, x; shrunk to small volumes), overlap 0.5, "
        "Gaussian blending of the softmax probabilities; argmax; back to the input's grid by nearest neighbour.",
    ]


def readme(meta: CheckpointMeta, source: str, measured: Sequence[str] = ()) -> str:
    """The README text; ``measured`` holds lines about the checks ``fed-eval export --check`` ran."""
    classes = ", ".join(f"{i} = {name}" for i, name in enumerate(meta.class_names))
    lines = [
        "# fedseg Attention U-Net: abdominal CT segmentation",
        "",
        f"A 3D {meta.model.arch} (feature scale {meta.model.feature_scale}) trained federatedly with fedseg, "
        f"exported from `{source}`. Output label values: {classes}.",
        "",
        "**Research use only; not a medical device.**",
        "",
        "[MODEL_CARD.md](../MODEL_CARD.md) (at the bundle's root) says what trained the model, how well it "
        "scored and what it is not for.",
        "",
        "## Run",
        "",
        "```bash",
        'pip install "monai[fire,ignite,nibabel]"',
        "python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\",
        "    --input_dir IN --output_dir OUT",
        "```",
        "",
        "Every `*.nii` / `*.nii.gz` in `IN` (a CT in Hounsfield units) becomes `OUT/<case>_seg.nii.gz`, a uint8 label "
        "map on the input's exact grid. `--device cpu` (or `cuda:0`) picks the device. Only MONAI, PyTorch, "
        "numpy and nibabel run; `scripts/fedseg_transforms.py` holds the three steps MONAI has no exact "
        "transform for (centred resampling grid with fedseg's anti-aliasing, body-region z-score, the fitted window).",
        "",
        "## Preprocessing (identical to fedseg's)",
        "",
        *_preprocessing(meta),
        "",
        "`models/model.ts` is the network alone (TorchScript): input (batch, 1, z, y, x) with every spatial side a "
        "multiple of 16, output logits (batch, classes, z, y, x).",
        "",
    ]
    if measured:
        lines += ["## Measured at export", "", *(f"- {line}" for line in measured), ""]
    lines += [
        "## Reference",
        "",
        "Oktay et al., Attention U-Net: Learning Where to Look for the Pancreas, MIDL 2018.",
        "",
    ]
    return "\n".join(lines)
