"""``fed-eval predict``: segment CT volumes with a checkpoint and write results in each input's exact geometry.

Inputs that do not look like CT (a label map, or no air near -1000 HU) are still predicted, with a warning.

Outputs per input ``<stem>`` (a NIfTI file name without its suffix, or a DICOM folder's name) in ``--out``:

* ``<stem>_seg.nii.gz``: the label map (uint8, global class indices);
* with ``--probabilities``: ``<stem>_prob_<class>.nii.gz``, one float32 probability volume per class
  (background included), so every file keeps the input's 3-D geometry;
* with ``--attention``: ``<stem>_<gate>.nii.gz`` per gated scale (α averaged over the gate's two sub-gates)
  and ``<stem>_attention.png``, an axial + sagittal montage of α over the CT.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from torch import nn

from fedseg.common.cli.shell import DEFAULT_DEVICE, DEVICE_HELP, guarded, result_table, stdout_console
from fedseg.common.data.io import Volume, is_nifti, read_volume, write_volume
from fedseg.common.data.layouts import case_stem
from fedseg.common.data.sitecheck import check_hounsfield
from fedseg.common.engine.checkpoint import CheckpointMeta, load_checkpoint
from fedseg.common.engine.device import resolve_device
from fedseg.common.engine.inference import predict_volume
from fedseg.common.errors import ConfigError, DataError
from fedseg.common.eval.attention_export import write_attention

log = logging.getLogger(__name__)

#: An input with at most this many distinct whole non-negative values is taken for a label map.
LABEL_MAP_MAX_VALUES = 256


@dataclass(frozen=True)
class PredictResult:
    """What was written for one input."""

    stem: str
    source: Path
    shape: tuple[int, int, int]
    seconds: float
    files: list[Path]


def find_inputs(path: Path) -> list[Path]:
    """The volumes behind ``--input``: a NIfTI file, every NIfTI file in a folder, or a DICOM series folder.

    Raises:
        DataError: the path does not exist or is a file that is not NIfTI.
    """
    if path.is_file():
        if not is_nifti(path):
            raise DataError(f"{path} is not a NIfTI file (.nii/.nii.gz) or a DICOM folder; check --input")
        return [path]
    if path.is_dir():
        niftis = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
        return niftis or [path]
    raise DataError(f"{path}: no such file or folder; check --input")


def input_warning(volume: Volume, source: Path) -> str | None:
    """Why ``volume`` does not look like a CT in Hounsfield units (a label map, no air, ...), or None."""
    array = volume.array
    if array.size and (array.dtype.kind in "iub" or bool(np.all(np.mod(array, 1) == 0))) and array.min() >= 0:
        values = np.unique(array)
        if values.size <= LABEL_MAP_MAX_VALUES:
            return (
                f"{source}: looks like a label map ({values.size} distinct whole values "
                f"{values[0]:g}..{values[-1]:g}), not a CT; check --input"
            )
    try:
        check_hounsfield(array, source)
    except DataError as err:
        return str(err)
    return None


def predict_file(
    model: nn.Module,
    meta: CheckpointMeta,
    source: Path,
    out_dir: Path,
    device: torch.device,
    *,
    attention: bool = False,
    probabilities: bool = False,
    tta: bool = False,
) -> PredictResult:
    """Read one input, predict it and write the requested files into ``out_dir``.

    Raises:
        DataError: the input cannot be read.
    """
    start = time.perf_counter()
    volume = read_volume(source)
    warning = input_warning(volume, source)
    if warning is not None:
        log.warning("%s; predicting anyway", warning)
    result = predict_volume(
        model, meta, volume, device, attention=attention, probabilities=probabilities, tta=tta, progress=True
    )
    stem = case_stem(source)
    files = [out_dir / f"{stem}_seg.nii.gz"]
    write_volume(result.labels, files[0])
    for name, prob in result.probabilities.items():
        files.append(out_dir / f"{stem}_prob_{name}.nii.gz")
        write_volume(prob, files[-1])
    if attention:
        files += write_attention(volume, result.attention, out_dir, stem, labels=result.labels.array)
    seconds = time.perf_counter() - start
    log.info("%s: predicted in %.1f s", source, seconds)
    return PredictResult(stem=stem, source=source, shape=volume.shape, seconds=seconds, files=files)


@guarded
def predict_command(
    model_path: Annotated[
        Path,
        typer.Option(
            "--model",
            help="Checkpoint (.pt): fed-eval train's OUT/best.pt, or a federation's, "
            "fed-server's OUTPUT_DIR/checkpoints/best.pt.",
        ),
    ],
    input_path: Annotated[
        Path, typer.Option("--input", help="A NIfTI file, a folder of NIfTI files, or a DICOM series folder.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (created).")],
    attention: Annotated[
        bool, typer.Option("--attention", help="Also write attention maps (NIfTI) and a PNG montage.")
    ] = False,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Also write <case>_prob_<class>.nii.gz per class.")
    ] = False,
    tta: Annotated[
        bool, typer.Option("--tta", help="Average over the four in-plane mirrorings (+~1 Dice point, 4x the time).")
    ] = False,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = DEFAULT_DEVICE,
) -> None:
    """Segment CT volumes; label maps keep each input's exact shape, spacing, origin and direction."""
    torch_device = resolve_device(device)
    model, meta = load_checkpoint(model_path)
    if attention and meta.model.arch != "attention-unet":
        raise ConfigError(f"--attention needs an attention-unet checkpoint; {model_path} holds {meta.model.arch}")
    results = [
        predict_file(model, meta, source, out, torch_device, attention=attention, probabilities=probabilities, tta=tta)
        for source in find_inputs(input_path)
    ]
    _render(results, out)


def _render(results: list[PredictResult], out: Path) -> None:
    console = stdout_console()
    table = result_table(console, f"Predictions in {out}")
    for column in ("input", "shape z,y,x", "seconds", "files"):
        table.add_column(column, justify="right" if column in ("seconds", "files") else "left", overflow="fold")
    for r in results:
        table.add_row(str(r.source), ",".join(map(str, r.shape)), f"{r.seconds:.1f}", str(len(r.files)))
    console.print(table)
