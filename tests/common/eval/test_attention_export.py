"""The attention montage: perceptual colour map over α's own range, a colour bar per gate, organ contours, aspect."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedseg.common.data.io import Volume
from fedseg.common.eval.attention_export import alpha_range, montage_figure, write_montage

SPACING = (5.0, 1.0, 1.0)  # (z, y, x) mm: thick slices
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _volumes() -> tuple[Volume, dict[str, Volume], np.ndarray]:
    ct = np.zeros((8, 16, 16), np.float32)
    alpha = np.broadcast_to(np.linspace(0.9, 1.0, 16, dtype=np.float32), (8, 16, 16)).copy()  # α 0.9-1.0 only
    labels = np.zeros((8, 16, 16), np.uint8)
    labels[2:6, 4:10, 4:10] = 4
    geometry = {"spacing": SPACING, "origin": (0.0, 0.0, 0.0), "direction": IDENTITY}
    return Volume(ct, **geometry), {"att2": Volume(alpha, **geometry)}, labels


def test_alpha_range_is_the_gates_own_and_never_empty() -> None:
    lo, hi = alpha_range(np.linspace(0.9, 1.0, 1001))
    assert (round(lo, 3), round(hi, 3)) == (0.901, 0.999)
    assert alpha_range(np.full(10, 0.95)) == (0.945, 0.955)


def test_montage_uses_the_gates_range_a_colour_bar_contours_and_the_spacing(tmp_path: Path) -> None:
    image, maps, labels = _volumes()
    fig = montage_figure(image, maps, labels)
    axial, sagittal, bar = fig.axes[0], fig.axes[1], fig.axes[2]
    overlay = axial.images[1]
    assert overlay.get_cmap().name == "magma"
    lo, hi = overlay.get_clim()
    assert 0.89 < lo < 0.91 and 0.99 < hi < 1.01  # not 0..1: the 0.9-1.0 gradient spans the whole colour map
    assert "0.90–1.00" in bar.get_ylabel()
    assert axial.get_aspect() == 1.0 and sagittal.get_aspect() == 5.0  # sagittal rows are 5 mm slices
    assert len(axial.collections) > 0 and len(sagittal.collections) > 0  # organ contours
    assert write_montage(image, maps, tmp_path / "m.png", labels).stat().st_size > 1000
