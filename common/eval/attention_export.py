# mypy: untyped-calls-exclude=SimpleITK
"""Export attention-gate coefficients α: NIfTI maps in the input geometry and a PNG montage (paper Fig. 3 style).

The montage is meant to be read: α in a perceptual colour map (``magma``, dark = low) stretched over each gate's
own range (1st-99th percentile, written on its colour bar: after training α is often 0.9-1.0 everywhere, which a
fixed 0-1 scale shows as one flat colour), the predicted organs outlined, and every panel drawn with the aspect
ratio of its voxel spacing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from fedseg.common.data.io import Volume, write_volume

log = logging.getLogger(__name__)

#: Abdominal soft-tissue window (HU) used to display the CT under the α overlay.
CT_WINDOW = (-160.0, 240.0)
#: Perceptually uniform colour map of the α overlay.
ALPHA_CMAP = "magma"


def alpha_range(alpha: np.ndarray) -> tuple[float, float]:
    """The display range of one gate's α: its 1st and 99th percentiles (widened to 0.01 if flatter)."""
    lo, hi = (float(v) for v in np.percentile(alpha, [1.0, 99.0]))
    if hi - lo < 0.01:
        mid = (hi + lo) / 2
        lo, hi = mid - 0.005, mid + 0.005
    return lo, hi


def inside_outside(alpha: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean α inside and outside a mask (NaN for an empty side).

    Args:
        alpha: attention map (z, y, x).
        mask: boolean or label map (z, y, x); non-zero means inside.
    """
    inside = mask.astype(bool)
    mean_in = float(alpha[inside].mean()) if inside.any() else float("nan")
    mean_out = float(alpha[~inside].mean()) if (~inside).any() else float("nan")
    return mean_in, mean_out


def focus_slices(labels: np.ndarray | None, shape: tuple[int, int, int]) -> tuple[int, int]:
    """Axial (z) and sagittal (x) slice indices: the foreground centre of mass, or the volume centre."""
    if labels is not None and labels.any():
        zz, _, xx = np.nonzero(labels)
        return int(np.round(zz.mean())), int(np.round(xx.mean()))
    return shape[0] // 2, shape[2] // 2


def _lps(volume: Volume) -> Volume:
    """The volume reoriented to LPS: (z, y, x) runs inferior→superior, anterior→posterior, right→left."""
    return Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), "LPS"))


def _show(
    ax: Axes,
    ct: np.ndarray,
    alpha: np.ndarray,
    organs: np.ndarray | None,
    span: tuple[float, float],
    aspect: float,
    origin: Literal["upper", "lower"],
) -> AxesImage:
    ax.imshow(ct, cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect, origin=origin)
    overlay = ax.imshow(alpha, cmap=ALPHA_CMAP, vmin=span[0], vmax=span[1], alpha=0.6, aspect=aspect, origin=origin)
    if organs is not None and organs.any():
        for value in np.unique(organs[organs > 0]):
            ax.contour(organs == value, levels=[0.5], colors="cyan", linewidths=0.8, origin=origin)
    ax.set_xticks([])
    ax.set_yticks([])
    return overlay


def write_montage(
    image: Volume,
    maps: Mapping[str, Volume],
    path: str | Path,
    labels: np.ndarray | None = None,
) -> Path:
    """Save a PNG grid: one row per gate, axial and sagittal slices, α over the CT (see the module docstring).

    Args:
        image: the CT in its own geometry (HU).
        maps: gate name -> α volume on the same grid as ``image``.
        path: the PNG to write (parent folders are created).
        labels: predicted labels (z, y, x) used to centre the slices on the organs.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    montage_figure(image, maps, labels).savefig(path, dpi=100)
    return path


def montage_figure(image: Volume, maps: Mapping[str, Volume], labels: np.ndarray | None = None) -> Figure:
    """The montage of :func:`write_montage` as a matplotlib Figure (one colour bar per gate)."""
    # Display in radiological convention whatever the file's direction cosines (RAS NIfTI, LPS DICOM, ...).
    oriented = _lps(image.with_array(image.array.astype(np.float32)))
    ct = oriented.array
    focus = _lps(image.with_array(labels.astype(np.uint8))).array if labels is not None else None
    z, x = focus_slices(focus, oriented.shape)
    sz, sy, sx = oriented.spacing
    fig = Figure(figsize=(8.0, 3.2 * max(1, len(maps))), layout="constrained")
    axes = fig.subplots(max(1, len(maps)), 2, squeeze=False)
    for row, (name, volume) in enumerate(sorted(maps.items())):
        alpha = _lps(volume).array
        span = alpha_range(alpha)
        axial_organs = focus[z] if focus is not None else None
        sagittal_organs = focus[:, :, x] if focus is not None else None
        _show(axes[row][0], ct[z], alpha[z], axial_organs, span, aspect=sy / sx, origin="upper")
        overlay = _show(axes[row][1], ct[:, :, x], alpha[:, :, x], sagittal_organs, span, sz / sy, origin="lower")
        bar = fig.colorbar(overlay, ax=list(axes[row]), shrink=0.9)
        bar.set_label(f"α of {name} ({span[0]:.2f}–{span[1]:.2f})")
        axes[row][0].set_ylabel(name)
        if row == 0:
            axes[row][0].set_title(f"axial z={z}")
            axes[row][1].set_title(f"sagittal x={x}")
    return fig


def write_attention(
    image: Volume,
    maps: Mapping[str, Volume],
    out_dir: str | Path,
    stem: str,
    labels: np.ndarray | None = None,
) -> list[Path]:
    """Write each gate's α as ``<stem>_<gate>.nii.gz`` and the montage as ``<stem>_attention.png``.

    Args:
        image: the input CT, in the geometry the maps share.
        maps: gate name -> α volume (z, y, x) in ``image``'s geometry.
        out_dir: output folder.
        stem: file name prefix, usually the case name.
        labels: predicted labels to centre the montage slices.

    Returns:
        The files written, NIfTI maps first.
    """
    out_dir = Path(out_dir)
    written = []
    for name, volume in sorted(maps.items()):
        target = out_dir / f"{stem}_{name}.nii.gz"
        write_volume(volume, target)
        written.append(target)
    written.append(write_montage(image, maps, out_dir / f"{stem}_attention.png", labels))
    log.info("wrote %d attention files for %s", len(written), stem)
    return written
