# mypy: untyped-calls-exclude=SimpleITK
"""Synthetic abdominal CT phantoms: several heterogeneous "hospital" datasets plus a central validation set.

Layout written by :func:`generate_phantoms` (Medical Segmentation Decathlon style, one folder per site)::

    out/site-1/{dataset.json, labels.toml, imagesTr/site1_000.nii.gz, labelsTr/site1_000.nii.gz}
    out/site-2/...
    out/validation/...      # neutral acquisition, global numbering

Realism choices (all values in adult millimetres / Hounsfield units before scaling):

* **Scaled adult abdomen.** The anatomy is defined for an adult in a 360 mm field of view and shrunk so that it
  fills the neutral field of view ``size * 2 mm``: a 64³ phantom is a 0.36× abdomen (128 mm wide). Relative organ
  sizes and HU stay adult; at the neutral 2 mm spacing (= :class:`~fedseg.common.data.preprocess.PreprocessConfig`'s
  default target spacing, the paper's 2 mm) a phantom becomes about 54–67 voxels in-plane and ``D`` slices, so
  the CPU demo stays small. Larger ``--size`` gives a proportionally larger (up to adult) body.
* **Tissues.** Air -1000 outside an elliptical body (flatter at the back); subcutaneous fat -100 of random
  thickness; a muscle wall 50; inside, bowel loops (30) and mesenteric fat (-90) from a thresholded smooth
  random field with rare gas pockets (-950). Spine with vertebral bodies (cancellous 250 HU, cortex 700, discs
  90 every 30 mm), spinal canal (15), posterior arch, paraspinal and psoas muscles, and six ribs (600) that slope
  down anteriorly in the upper half. Stomach (wall 45, fluid 15, anterior gas cap), gallbladder (10) and a
  duodenal C-loop (25) around the pancreatic head.
* **Labelled organs.** Liver 60 (two lobes), spleen 50, kidneys with bright cortex (120, corticomedullary phase),
  medulla 35 and an unlabelled fat-filled sinus, and a thin, curved pancreas (40 HU, a tube of 7–13 mm radius
  along a spline from the head by the duodenum to the tail at the splenic hilum). Contrast-filled vessels
  (aorta 190, IVC / portal / superior mesenteric / splenic vein 160) run next to the pancreas and are never
  labelled, so the model must learn shape and context, not a threshold: pancreas, bowel and medulla overlap in HU.
* **Per case**: random body size (±10 %), table position, fat thickness, organ position (±5 mm) and size
  (±12 %), pancreas path, a smooth random deformation of space (±6 mm, wavelength ~260 mm) and per-organ
  texture (±6 HU).
* **Per site** (the acquisition, :class:`Acquisition`): slice spacing = thickness 1.5–5 mm, cycling through
  1.5, 5, 3, 2.5, 4, 2, 3.5, 4.5 mm so that neighbouring sites always differ (thick slices average
  sub-slices: partial volume in z), in-plane field of view 0.85–1.05× (2 mm pixels × fov), HU scale 0.92–1.08 and
  offset ±25 (calibration), in-plane blur σ 0.4–1 voxel (reconstruction kernel) and correlated noise 8–30 HU
  (white noise smoothed with σ = 1 voxel, rescaled). Every third site writes RAS instead of LPS direction cosines
  (a dcm2niix-style export), so preprocessing must reorient. The validation set is neutral: 2 mm isotropic,
  no offset, 15 HU noise.
* **Labels** are written in each site's own numbering, described by its ``labels.toml`` manifest: 1 pancreas,
  2 spleen, 3 kidney, 4 liver; the second full site writes the left kidney as 5 (mapped to kidney too); with
  ``partial_site`` the last site annotates only pancreas and liver (other organs are 0, and its manifest's
  ``annotated`` says so).

Everything is drawn from ``numpy.random.default_rng((seed, ...))`` in a fixed order, so the same seed gives
identical arrays and identical file bytes.

(Longer than 300 lines only through this docstring, which documents every realism choice in one place.)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tomli_w
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.progress import Progress
from scipy import ndimage

from fedseg.common.console import console
from fedseg.common.data.io import Volume, write_volume
from fedseg.common.errors import ConfigError
from fedseg.common.synthetic.anatomy import KIDNEY_L, ORGANS, Anatomy

log = logging.getLogger(__name__)

#: Neutral acquisition spacing (mm); equals PreprocessConfig's default target spacing.
NEUTRAL_SPACING_MM = 2.0
#: In-plane field of view (adult mm) that the anatomy below is drawn in; it is scaled to ``size * 2 mm``.
ADULT_FOV_MM = 360.0
#: Global classes annotated by the partial site (``partial_site=True``).
PARTIAL_CLASSES: tuple[str, ...] = ("pancreas", "liver")
ALL_CLASSES: tuple[str, ...] = ("pancreas", "spleen", "kidney", "liver")

_SLICE_SPACINGS = (1.5, 5.0, 3.0, 2.5, 4.0, 2.0, 3.5, 4.5)


class PhantomConfig(BaseModel):
    """What :func:`generate_phantoms` writes; stored in every ``dataset.json`` for provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sites: int = Field(default=3, ge=1, le=1000)  # fed-server simulate studies up to ~100 sites
    cases_per_site: int = Field(default=4, ge=1, le=1000)
    val_cases: int = Field(default=2, ge=0, le=1000)
    size: tuple[int, int, int] = Field(default=(64, 64, 64), description="neutral grid (D, H, W), 16..512 each")
    seed: int = Field(default=0, ge=0)
    partial_site: bool = False

    @field_validator("size")
    @classmethod
    def _check_size(cls, size: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(size) < 16 or max(size) > 512:
            raise ValueError(f"size must be 16..512 voxels per side, got {size}")
        return size


@dataclass(frozen=True)
class Acquisition:
    """How one site scans (see the module docstring for the ranges).

    Attributes:
        spacing_z: slice spacing and thickness, mm.
        fov_scale: in-plane field of view relative to the neutral one (pixel size ``2 mm * fov_scale``).
        hu_scale: multiplies the HU values (calibration).
        hu_offset: added to the HU values after scaling.
        noise_sd: standard deviation of the correlated noise, HU.
        blur_sigma: in-plane Gaussian blur (reconstruction kernel), voxels.
        orientation: ITK orientation code the files are written in (``"LPS"`` or ``"RAS"``).
    """

    spacing_z: float
    fov_scale: float
    hu_scale: float
    hu_offset: float
    noise_sd: float
    blur_sigma: float
    orientation: str


NEUTRAL_ACQUISITION = Acquisition(2.0, 1.0, 1.0, 0.0, 15.0, 0.6, "LPS")


@dataclass(frozen=True)
class PhantomSite:
    """One dataset folder written by :func:`generate_phantoms`.

    Attributes:
        name: folder name (``site-1`` ... or ``validation``).
        index: 1-based site number, 0 for the validation set (part of the random seed).
        cases: number of cases.
        acquisition: the site's scanner settings.
        labels: source label value -> global class, as in the site's ``labels.toml``.
        annotated: global classes the site annotates.
        split_kidneys: the left kidney is written as 5 instead of 3.
    """

    name: str
    index: int
    cases: int
    acquisition: Acquisition
    labels: dict[int, str]
    annotated: tuple[str, ...]
    split_kidneys: bool


def site_acquisition(index: int, seed: int) -> Acquisition:
    """The acquisition of site ``index`` (1-based), drawn from ``seed``; every third site writes RAS.

    Slice spacing cycles through 1.5–5 mm, and field of view and noise follow golden-ratio sequences, so that
    neighbouring sites always differ; calibration and blur are random.
    """
    rng = np.random.default_rng((seed, 1, index))
    spread = [(seed * 0.7549 + index * offset) % 1.0 for offset in (0.6180, 0.3820)]
    return Acquisition(
        spacing_z=_SLICE_SPACINGS[(index - 1 + seed) % len(_SLICE_SPACINGS)],
        fov_scale=round(0.85 + 0.2 * spread[0], 3),
        hu_scale=round(float(rng.uniform(0.92, 1.08)), 3),
        hu_offset=round(float(rng.uniform(-25.0, 25.0)), 1),
        noise_sd=round(8.0 + 22.0 * spread[1], 1),
        blur_sigma=round(float(rng.uniform(0.4, 1.0)), 2),
        orientation="RAS" if index % 3 == 0 else "LPS",
    )


def site_grid(size: tuple[int, int, int], acq: Acquisition) -> tuple[tuple[int, int, int], tuple[float, ...]]:
    """Array shape ``(Z, Y, X)`` and spacing ``(z, y, x)`` mm of a site's images for a neutral ``size``."""
    d, h, w = size
    nz = max(1, round(d * NEUTRAL_SPACING_MM / acq.spacing_z))
    sxy = NEUTRAL_SPACING_MM * acq.fov_scale
    return (nz, h, w), (acq.spacing_z, sxy, sxy)


def render_case(size: tuple[int, int, int], acq: Acquisition, key: tuple[int, ...]) -> tuple[Volume, Volume]:
    """Render one random phantom case as a site with acquisition ``acq`` would scan it.

    Args:
        size: the neutral grid ``(D, H, W)`` at 2 mm; the site's grid follows from :func:`site_grid`.
        acq: the acquisition (spacing, field of view, intensity calibration, noise, orientation).
        key: random seed entropy, e.g. ``(seed, 2, site_index, case_index)``.

    Returns:
        ``(image, organs)``: int16 HU volume and uint8 organ map (:data:`ORGANS` ids, 5 = left kidney), both
        ``(Z, Y, X)`` on the same grid.
    """
    rng = np.random.default_rng(key)
    anatomy = Anatomy(rng)
    (nz, h, w), (sz, sxy, _) = site_grid(size, acq)
    scale = min(size[1], size[2]) * NEUTRAL_SPACING_MM / ADULT_FOV_MM  # phantom mm per adult mm
    n_sub = math.ceil(sz / NEUTRAL_SPACING_MM) | 1  # odd number of sub-slices per (thick) slice
    zc = (np.arange(nz) - (nz - 1) / 2) * sz
    zs = (zc[:, None] + ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * sz).ravel()
    yc = (np.arange(h) - (h - 1) / 2) * sxy
    xc = (np.arange(w) - (w - 1) / 2) * sxy
    grid = np.meshgrid(*(np.float32(c / scale) for c in (zs, yc, xc)), indexing="ij")
    hu, organs = anatomy.render(grid[2], grid[1], grid[0])
    hu = hu.reshape(nz, n_sub, h, w).mean(axis=1)
    organs = np.ascontiguousarray(organs.reshape(nz, n_sub, h, w)[:, n_sub // 2])
    hu = ndimage.gaussian_filter(hu, (0.0, acq.blur_sigma, acq.blur_sigma))
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape, np.float32), (0.3, 1.0, 1.0))
    hu = (hu + noise * np.float32(acq.noise_sd / noise.std())) * acq.hu_scale + acq.hu_offset
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    origin = (float(xc[0]), float(yc[0]), float(zc[0]))
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    volumes = [Volume(array=a, spacing=(sz, sxy, sxy), origin=origin, direction=identity) for a in (image, organs)]
    if acq.orientation != "LPS":
        volumes = [Volume.from_sitk(sitk.DICOMOrient(v.to_sitk(), acq.orientation)) for v in volumes]
    return volumes[0], volumes[1]


def plan_sites(cfg: PhantomConfig) -> list[PhantomSite]:
    """The sites (then the validation set, when ``cfg.val_cases``) that :func:`generate_phantoms` writes."""
    full = [i for i in range(1, cfg.sites + 1) if not (cfg.partial_site and i == cfg.sites)]
    split = full[1] if len(full) > 1 else None
    sites = []
    for index in range(1, cfg.sites + 1):
        annotated = ALL_CLASSES if index in full else PARTIAL_CLASSES
        sites.append(_site(f"site-{index}", index, cfg.cases_per_site, site_acquisition(index, cfg.seed),
                           annotated, index == split))  # fmt: skip
    if cfg.val_cases:
        sites.append(_site("validation", 0, cfg.val_cases, NEUTRAL_ACQUISITION, ALL_CLASSES, False))
    return sites


def _site(name: str, index: int, cases: int, acq: Acquisition, annotated: tuple[str, ...], split: bool) -> PhantomSite:
    labels = {v: c for v, c in ((1, "pancreas"), (2, "spleen"), (3, "kidney"), (4, "liver")) if c in annotated}
    if split and "kidney" in annotated:
        labels[5] = "kidney"
    return PhantomSite(name, index, cases, acq, labels, annotated, split and "kidney" in annotated)


def site_label_table(site: PhantomSite) -> np.ndarray:
    """Lookup table organ id (:data:`ORGANS`) -> the site's source label value (0 where not annotated)."""
    values = {1: 1, 2: 2, 3: 3, 4: 4, KIDNEY_L: 5 if site.split_kidneys else 3}
    table = np.zeros(len(ORGANS) + 1, np.uint8)
    for organ_id, value in values.items():
        if ORGANS[organ_id] in site.annotated:
            table[organ_id] = value
    return table


def generate_phantoms(
    out: str | Path,
    sites: int = 3,
    cases_per_site: int = 4,
    val_cases: int = 2,
    size: tuple[int, int, int] = (64, 64, 64),
    seed: int = 0,
    partial_site: bool = False,
) -> list[PhantomSite]:
    """Write phantom sites and a validation set under ``out`` (see the module docstring for the layout).

    Args:
        out: output folder; must be absent or empty.
        sites: number of sites ``site-1`` ... ``site-N``.
        cases_per_site: cases per site.
        val_cases: cases of the neutral ``validation`` set (0 writes none).
        size: neutral grid ``(D, H, W)`` at 2 mm; sets the body size and each site's matrix.
        seed: the same seed gives identical files.
        partial_site: the last site annotates only :data:`PARTIAL_CLASSES`.

    Returns:
        The written sites, validation last.

    Raises:
        ConfigError: ``out`` is not empty.
        pydantic.ValidationError: a count or size is out of range.
    """
    cfg = PhantomConfig(sites=sites, cases_per_site=cases_per_site, val_cases=val_cases, size=size, seed=seed,
                        partial_site=partial_site)  # fmt: skip
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: output folder is not empty; choose a new --out or delete it")
    planned = plan_sites(cfg)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("phantoms", total=sum(site.cases for site in planned))
        for site in planned:
            _write_site(out / site.name, site, cfg, lambda: progress.advance(task))
    log.info("wrote %d phantom datasets to %s", len(planned), out)
    return planned


def _write_site(root: Path, site: PhantomSite, cfg: PhantomConfig, advance: Callable[[], None]) -> None:
    prefix = "val" if site.index == 0 else f"site{site.index}"
    table = site_label_table(site)
    training = []
    for case in range(site.cases):
        name = f"{prefix}_{case:03d}.nii.gz"
        image, organs = render_case(cfg.size, site.acquisition, (cfg.seed, 2, site.index, case))
        write_volume(image, root / "imagesTr" / name)
        write_volume(organs.with_array(table[organs.array]), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        advance()
    names = {0: "background"} | {v: _source_name(v, c, site.split_kidneys) for v, c in site.labels.items()}
    meta = {
        "name": f"fedseg-phantom-{site.name}",
        "description": "Synthetic abdominal CT phantom (fedseg.common.synthetic.phantoms); labels per labels.toml",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(v): n for v, n in sorted(names.items())},
        "numTraining": site.cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "phantom": {"config": cfg.model_dump(mode="json"), "site": site.index, "acquisition": asdict(site.acquisition)},
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    manifest = {
        "site": site.name,
        "annotated": list(site.annotated),
        "other_labels": "error",
        "labels": {str(v): c for v, c in sorted(site.labels.items())},
    }
    header = "# Label manifest of a fedseg phantom site (global classes: pancreas, spleen, kidney, liver).\n"
    if site.split_kidneys:
        header += "# This site numbers the kidneys apart (3 right, 5 left); both map to the global class kidney.\n"
    if site.annotated != ALL_CLASSES:
        header += "# Partial annotation: organs not listed in `annotated` are unlabelled (0), not background.\n"
    (root / "labels.toml").write_text(header + tomli_w.dumps(manifest), encoding="utf-8")


def _source_name(value: int, global_class: str, split: bool) -> str:
    if split and global_class == "kidney":
        return "kidney_left" if value == 5 else "kidney_right"
    return global_class
