"""Run an exported bundle with MONAI alone (``python -m monai.bundle run`` in a child process) on a CT and compare
its label map with fedseg's prediction of the same CT: Dice per organ present, and the geometry of the file."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedseg.common.data.io import Volume, read_volume
from fedseg.common.data.layouts import case_stem
from fedseg.common.data.manifest import default_manifest
from fedseg.common.data.preprocess import preprocess_case, restore_to_source
from fedseg.common.engine.checkpoint import CheckpointMeta
from fedseg.common.engine.inference import sliding_window_predict
from fedseg.common.errors import DataError
from fedseg.common.eval.metrics import dice_per_class
from fedseg.common.export.bundle import CONFIG_FILE

#: The agreement a bundle must reach with fedseg (issue 28): Dice per organ present.
MIN_DICE = 0.99
#: Geometry tolerances (mm, direction cosines), as tight as a NIfTI header round trip keeps them.
SPACING_TOL, ORIGIN_TOL, DIRECTION_TOL = 1e-4, 1e-3, 1e-5


@dataclass(frozen=True)
class OrganAgreement:
    """One organ in both label maps."""

    name: str
    fedseg_voxels: int
    bundle_voxels: int
    dice: float


@dataclass(frozen=True)
class BundleAgreement:
    """The bundle's label map next to fedseg's for one CT.

    Attributes:
        organs: every foreground class present in either map.
        geometry: None when shape, spacing, origin and direction match, else what differs.
        bundle_seconds: ``monai.bundle run`` from start to exit (interpreter and imports included).
        fedseg_seconds: fedseg's prediction of the same CT (fp32, CPU).
    """

    organs: tuple[OrganAgreement, ...]
    geometry: str | None
    bundle_seconds: float
    fedseg_seconds: float

    @property
    def ok(self) -> bool:
        """Same geometry and every organ at :data:`MIN_DICE` or more."""
        return self.geometry is None and all(o.dice >= MIN_DICE for o in self.organs)


def run_bundle(folder: Path, input_dir: Path, output_dir: Path, device: str = "cpu") -> float:
    """``python -m monai.bundle run`` the bundle in ``folder`` on ``input_dir``; returns its wall seconds.

    Raises:
        DataError: the run failed (its last error line says why).
    """
    folder, input_dir, output_dir = folder.resolve(), input_dir.resolve(), output_dir.resolve()
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(folder / CONFIG_FILE)]
    command += ["--bundle_root", str(folder), "--input_dir", str(input_dir), "--output_dir", str(output_dir)]
    command += ["--device", f"$torch.device('{device}')"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=output_dir.parent, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise DataError(f"the bundle did not run ({lines[-1] if lines else f'exit {done.returncode}'})")
    return time.perf_counter() - start


def fedseg_labels(model: nn.Module, meta: CheckpointMeta, volume: Volume) -> Volume:
    """``fed-eval predict``'s label map in fp32 on the CPU (predict uses bf16 where the CPU has it natively)."""
    case = preprocess_case(volume, None, default_manifest(), meta.preprocess)
    pred = sliding_window_predict(model, case.image, meta.patch_size, torch.device("cpu"), amp=False)
    return restore_to_source(pred.labels, case, is_label=True)


def geometry_difference(a: Volume, b: Volume) -> str | None:
    """What differs between the grids of ``a`` and ``b`` (None: the same grid)."""
    if a.shape != b.shape:
        return f"shape {b.shape} instead of {a.shape}"
    checks = (
        ("spacing", a.spacing, b.spacing, SPACING_TOL),
        ("origin", a.origin, b.origin, ORIGIN_TOL),
        ("direction", a.direction, b.direction, DIRECTION_TOL),
    )
    for name, want, got, tol in checks:
        if not np.allclose(want, got, rtol=0, atol=tol):
            return f"{name} {_rounded(got)} instead of {_rounded(want)}"
    return None


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(float(v), 5) for v in values)


def compare(model: nn.Module, meta: CheckpointMeta, folder: Path, image: Path) -> BundleAgreement:
    """Segment ``image`` (NIfTI) with the bundle in ``folder`` and with fedseg, and compare the two label maps.

    Raises:
        DataError: the image cannot be read, or the bundle did not run or wrote no label map.
    """
    volume = read_volume(image)
    start = time.perf_counter()
    ours = fedseg_labels(model, meta, volume)
    fedseg_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="fedseg-bundle-check-") as tmp:
        input_dir, output_dir = Path(tmp) / "in", Path(tmp) / "out"
        input_dir.mkdir()
        (input_dir / image.name).symlink_to(image.resolve())
        seconds = run_bundle(folder, input_dir, output_dir)
        written = output_dir / f"{case_stem(image)}_seg.nii.gz"
        if not written.is_file():
            raise DataError(f"the bundle ran but wrote no {written.name} into its output folder")
        theirs = read_volume(written)
    geometry = geometry_difference(ours, theirs)
    organs: tuple[OrganAgreement, ...] = ()
    if geometry is None:
        organs = _organs(ours.array, theirs.array.astype(np.uint8), meta.class_names)
    return BundleAgreement(organs=organs, geometry=geometry, bundle_seconds=seconds, fedseg_seconds=fedseg_seconds)


def _organs(ours: np.ndarray, theirs: np.ndarray, names: tuple[str, ...]) -> tuple[OrganAgreement, ...]:
    if theirs.max(initial=0) >= len(names):
        raise DataError(f"the bundle wrote label {int(theirs.max())}; the model has only {len(names)} classes")
    dice = dice_per_class(theirs, ours, len(names))
    counts = [(int((ours == c).sum()), int((theirs == c).sum())) for c in range(len(names))]
    return tuple(
        OrganAgreement(names[c], counts[c][0], counts[c][1], float(dice[c]))
        for c in range(1, len(names))
        if counts[c][0] or counts[c][1]
    )
