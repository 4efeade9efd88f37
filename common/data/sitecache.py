"""Preprocess a whole site's dataset folder once, caching every prepared case on disk.

See :func:`prepare_site` for the cache key; :mod:`fedseg.common.data.preprocess` does the per-case work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from fedseg.common.console import console
from fedseg.common.data.intensity import IntensityStats
from fedseg.common.data.io import read_volume
from fedseg.common.data.layouts import CaseFiles, discover_cases
from fedseg.common.data.manifest import LabelManifest
from fedseg.common.data.preprocess import Grid, PreparedCase, PreprocessConfig, SourceGeometry, preprocess_case
from fedseg.common.errors import DataError

log = logging.getLogger(__name__)

#: Bump when the preprocessing code changes what it produces, so stale cache entries are not reused.
CACHE_VERSION = 1


def prepare_site(
    root: str | Path,
    manifest: LabelManifest,
    cfg: PreprocessConfig,
    cache_dir: str | Path | None,
) -> list[PreparedCase]:
    """Preprocess every case of a site's dataset folder, reusing cached results.

    Each prepared case is stored as ``cache_dir/<case_id>.<fingerprint>.npz``. The fingerprint hashes the image
    and label files' resolved paths, sizes and modification times (every file of a DICOM folder), the manifest,
    ``cfg`` and :data:`CACHE_VERSION`, so editing a file or a setting re-preprocesses only what changed; a
    second run loads everything from the cache. Old entries are never deleted (delete the folder to reclaim
    space); unreadable entries are recomputed.

    Under ``cfg.normalization == "site"`` the folder is one site: each entry keeps its case z-scored with its own
    body statistics and those statistics (voxel count, mean, sd), and the returned cases are z-scored with the
    statistics pooled over every case of the folder (:func:`site_normalised`),
    labelled or not. Nothing but this function's caller sees them.

    Args:
        root: dataset folder in any layout :func:`~fedseg.common.data.layouts.discover_cases` accepts.
        manifest: the site's label mapping.
        cfg: preprocessing settings.
        cache_dir: cache folder (created when missing), or None to preprocess without caching.

    Returns:
        Prepared cases sorted by case id.

    Raises:
        DataError: unreadable dataset, image or label (the message names the file or case).
    """
    cases = discover_cases(root)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    prepared, hits = [], 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"prepare {Path(root).name}", total=len(cases))
        for files in cases:
            path = cache / f"{files.case_id}.{case_fingerprint(files, manifest, cfg)}.npz" if cache else None
            case = _load_cached(path) if path is not None else None
            if case is None:
                case = _prepare_files(files, manifest, cfg)
                if path is not None:
                    _save_cached(case, path)
            else:
                hits += 1
            prepared.append(case)
            progress.advance(task)
    log.info("prepared %d cases of %s (%d from cache)", len(prepared), root, hits)
    prepared = site_normalised(prepared, cfg)
    if cfg.normalization == "site" and prepared and prepared[0].intensity is not None:
        stats = prepared[0].intensity
        log.info(
            "site intensity statistics of %s: mean %.1f HU, sd %.1f HU over %d body voxels of %d cases",
            root, stats.mean, stats.std, stats.voxels, len(prepared),
        )  # fmt: skip
    return prepared


def site_normalised(cases: Sequence[PreparedCase], cfg: PreprocessConfig) -> list[PreparedCase]:
    """Under ``normalization="site"``, ``cases`` z-scored with their pooled statistics; otherwise ``cases``.

    Every case must carry the statistics it was z-scored with (``preprocess_case`` records them); the image is
    mapped affinely from those onto the pooled ones, which equals z-scoring the clipped HU with the pooled mean
    and sd.

    Raises:
        ValueError: a case without recorded statistics.
    """
    if cfg.normalization != "site" or not cases:
        return list(cases)
    own = [c.intensity for c in cases]
    missing = [c.case_id for c, stats in zip(cases, own, strict=True) if stats is None]
    if missing:
        raise ValueError(f"cases {missing} carry no intensity statistics to pool; prepare them again")
    parts = [stats for stats in own if stats is not None]
    pooled = IntensityStats.pooled(parts)
    out = []
    for case, stats in zip(cases, parts, strict=True):
        gain = np.float32(stats.scale / pooled.scale)
        shift = np.float32((stats.mean - pooled.mean) / pooled.scale)
        image = (case.image * gain + shift).astype(np.float32)
        out.append(PreparedCase(case.case_id, image, case.label, case.annotated, case.source, pooled))
    return out


def case_fingerprint(files: CaseFiles, manifest: LabelManifest, cfg: PreprocessConfig) -> str:
    """16 hex digits identifying a case's source files (path, size, mtime), the manifest and the settings."""
    payload = {
        "version": CACHE_VERSION,
        "image": _stamp(files.image),
        "label": _stamp(files.label) if files.label is not None else None,
        "manifest": manifest.model_dump(mode="json"),
        "config": cfg.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _stamp(path: Path) -> list[tuple[str, int, int]]:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stamps = []
    for file in files:
        stat = file.stat()
        stamps.append((str(file.resolve()), stat.st_size, stat.st_mtime_ns))
    return stamps


def _prepare_files(files: CaseFiles, manifest: LabelManifest, cfg: PreprocessConfig) -> PreparedCase:
    image = read_volume(files.image)
    label = read_volume(files.label) if files.label is not None else None
    return preprocess_case(image, label, manifest, cfg, case_id=files.case_id)


def _save_cached(case: PreparedCase, path: Path) -> None:
    """Write ``case`` atomically (temporary file, then rename) so an interrupted run leaves no broken entry."""
    stats = asdict(case.intensity) if case.intensity is not None else None
    arrays: dict[str, Any] = {  # Any: np.savez's **kwds would otherwise clash with its allow_pickle flag
        "image": case.image,
        "annotated": np.asarray(case.annotated, bool),
        "meta": np.asarray(json.dumps({"case_id": case.case_id, "source": asdict(case.source), "intensity": stats})),
    }
    if case.label is not None:
        arrays["label"] = case.label
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path) -> PreparedCase | None:
    """The cached case at ``path``, or None when absent or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            label = data["label"] if "label" in data.files else None
            image, annotated = data["image"], tuple(bool(v) for v in data["annotated"])
        grids = {key: Grid(**{k: tuple(v) for k, v in value.items()}) for key, value in meta["source"].items()}
        stats = IntensityStats(**meta["intensity"]) if meta.get("intensity") is not None else None
        return PreparedCase(meta["case_id"], image, label, annotated, SourceGeometry(**grids), stats)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        log.warning("cache entry %s is unreadable (%s); preprocessing the case again", path, err)
        return None


def prepare_labelled(
    root: str | Path,
    manifest: LabelManifest,
    cfg: PreprocessConfig,
    cache_dir: str | Path | None,
    *,
    role: str,
    use: str,
) -> list[PreparedCase]:
    """:func:`prepare_site`, keeping the cases that have a label map.

    Args:
        role: how the user named the folder, for the message (``--val``, ``site hospital-a``, ``validation.data``).
        use: what the cases are for, for the message (``train on``, ``validate on``).

    Raises:
        DataError: as :func:`prepare_site`, or no case has labels.
    """
    labelled = [case for case in prepare_site(root, manifest, cfg, cache_dir) if case.label is not None]
    if not labelled:
        raise DataError(f"{role}: {root} has no labelled case to {use}; add label maps or choose another folder")
    return labelled
