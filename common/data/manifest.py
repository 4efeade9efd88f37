"""Site label manifests: how one hospital's label values map onto the federation's global classes.

Every site labels its scans its own way (TotalSegmentator numbers ~117 structures, the Medical Segmentation
Decathlon pancreas task has pancreas 1 and tumour 2, ...). A manifest maps each source value to one of
:data:`GLOBAL_CLASSES` and says which global classes the site actually annotates, so a site without liver labels
does not teach the model that the liver is background.

Mapping rule (:meth:`LabelManifest.to_global`):

* label value 0 is background unless the manifest lists it;
* every value listed under ``[labels]`` maps to its global class (several values may share one class, e.g.
  kidney_left and kidney_right both map to ``"kidney"``);
* any other value maps to background when ``other_labels = "background"`` (TotalSegmentator-style maps with many
  unused structures); with the default ``other_labels = "error"`` it raises :class:`DataError` naming the value,
  because an unexpected value usually means the wrong manifest.

TOML form::

    site = "site-1"
    annotated = ["pancreas", "spleen", "kidney", "liver"]   # optional; default = every class mapped below
    other_labels = "error"                                    # or "background"
    [labels]
    "1" = "spleen"
    "2" = "kidney"
"""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedseg.common.errors import ConfigError, DataError, format_validation_error

log = logging.getLogger(__name__)

#: The federation's classes; the index is the value in global label maps and the model's output channel.
GLOBAL_CLASSES: tuple[str, ...] = ("background", "pancreas", "spleen", "kidney", "liver")

#: File name of a site's own manifest inside its dataset folder (the phantom generator writes one, for example).
SITE_MANIFEST = "labels.toml"

#: Folder of the example manifests shipped with fedseg (phantom, totalsegmentator, msd_pancreas).
BUILTIN_MANIFESTS = Path(__file__).parent / "manifests"

_MAX_LISTED = 8


class LabelManifest(BaseModel):
    """A site's mapping from source label values to global classes.

    Attributes:
        site: optional site name, shown in messages.
        labels: source label value -> global class name (one of :data:`GLOBAL_CLASSES`).
        annotated: global classes this site annotates; defaults to every non-background class in ``labels``.
        other_labels: what happens to values not in ``labels`` (other than 0): ``"error"`` or ``"background"``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str | None = Field(default=None, description="optional site name, shown in messages")
    labels: dict[int, str] = Field(description="source label value -> global class name")
    annotated: list[str] = Field(
        default_factory=list, description="global classes this site annotates; default every class in labels"
    )
    other_labels: Literal["error", "background"] = Field(
        default="error", description="label values not in labels (other than 0): an error, or background"
    )

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: dict[int, str]) -> dict[int, str]:
        for value, name in labels.items():
            if value < 0:
                raise ValueError(f"label value {value} is negative; source label values are 0 or more")
            _check_class_name(name)
        return labels

    @field_validator("annotated")
    @classmethod
    def _check_annotated(cls, annotated: list[str]) -> list[str]:
        for name in annotated:
            _check_class_name(name)
        return annotated

    @model_validator(mode="after")
    def _default_and_check_annotated(self) -> LabelManifest:
        mapped = {name for name in self.labels.values() if name != "background"}
        if not self.annotated:
            ordered = [name for name in GLOBAL_CLASSES if name in mapped]
            object.__setattr__(self, "annotated", ordered)  # frozen model: fill the default once, here
        missing = [name for name in self.annotated if name != "background" and name not in mapped]
        if missing:
            raise ValueError(f"annotated classes {missing} have no label value mapped to them in the labels table")
        return self

    def annotated_mask(self) -> tuple[bool, ...]:
        """One flag per global class (background always True): is the class annotated at this site."""
        return tuple(name == "background" or name in self.annotated for name in GLOBAL_CLASSES)

    def to_global(self, label: np.ndarray) -> np.ndarray:
        """Map a source label map to global class indices.

        Args:
            label: source label values, any shape (usually ``(Z, Y, X)``); an integer array, or a float array
                holding whole numbers.

        Returns:
            uint8 array of the same shape with values in ``range(len(GLOBAL_CLASSES))``.

        Raises:
            DataError: fractional or NaN values, or values not in the manifest when ``other_labels = "error"``.
        """
        present = label_values(label)
        unknown = [v for v in present if v != 0 and v not in self.labels]
        if unknown and self.other_labels == "error":
            raise DataError(
                f"label values {_listing(unknown)} are not in the label manifest{self._where()}; "
                'map them in the manifest\'s labels table or set other_labels = "background"'
            )
        result = np.zeros(label.shape, dtype=np.uint8)
        for value, name in self.labels.items():
            index = GLOBAL_CLASSES.index(name)
            if index != 0 and value in present:
                result[label == value] = index
        return result

    def _where(self) -> str:
        return f" of site {self.site}" if self.site else ""


def label_values(label: np.ndarray) -> list[int]:
    """The distinct values of a label map, sorted.

    Raises:
        DataError: the array is not numeric, holds NaN/inf, or holds fractional values.
    """
    if label.dtype.kind in "bu" and label.dtype.itemsize <= 2:
        counts = np.bincount(label.ravel())  # linear time, much faster than the sort in np.unique
        return [int(v) for v in np.flatnonzero(counts)]
    if label.dtype.kind in "iub":
        return [int(v) for v in np.unique(label)]
    if label.dtype.kind != "f":
        raise DataError(f"label map has non-numeric type {label.dtype}; store labels as integers")
    values = np.unique(label)
    if not np.all(np.isfinite(values)):
        raise DataError("label map holds NaN or infinite values; store labels as integers")
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise DataError(
            f"label map holds non-integer values {_listing([float(v) for v in fractional])}; "
            "labels must be whole numbers (is this an image instead of a label map?)"
        )
    return [int(v) for v in values]


def load_manifest(path: str | Path) -> LabelManifest:
    """Load a manifest from a ``.toml`` or ``.json`` file, or a built-in one by bare name.

    Args:
        path: a file path, or the stem of a file in :data:`BUILTIN_MANIFESTS` (e.g. ``"totalsegmentator"``).

    Raises:
        ConfigError: missing file, unknown suffix, invalid TOML/JSON or invalid content; the message names the file.
    """
    path = _resolve(Path(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read label manifest ({err.__class__.__name__}); check the path") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: invalid {path.suffix.lstrip('.').upper()} ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a label manifest must be a TOML table or JSON object with a labels table")
    try:
        return LabelManifest.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_validation_error(err)}") from None


def site_manifest(data_dir: str | Path, labels: str | Path | None = None) -> LabelManifest:
    """The manifest a site uses: ``labels`` if given, else ``data_dir/labels.toml``, else :func:`default_manifest`.

    Raises:
        ConfigError: the chosen manifest file is missing or invalid (see :func:`load_manifest`).
    """
    if labels is not None:
        return load_manifest(labels)
    site_file = Path(data_dir) / SITE_MANIFEST
    if site_file.is_file():
        log.info("using label manifest %s", site_file)
        return load_manifest(site_file)
    log.info("no label manifest and no %s: assuming labels 1 pancreas, 2 spleen, 3 kidney, 4 liver", site_file)
    return default_manifest()


def default_manifest() -> LabelManifest:
    """Identity mapping for data already in global numbering: 1 pancreas, 2 spleen, 3 kidney, 4 liver."""
    return LabelManifest(labels={index: name for index, name in enumerate(GLOBAL_CLASSES) if index})


def builtin_manifest_names() -> list[str]:
    """Names accepted by :func:`load_manifest` in place of a path."""
    return sorted(p.stem for p in BUILTIN_MANIFESTS.glob("*.toml"))


def _resolve(path: Path) -> Path:
    """Return ``path`` itself, or the built-in manifest it names; ConfigError when neither exists."""
    if path.is_file():
        if path.suffix.lower() not in (".toml", ".json"):
            raise ConfigError(f"{path}: label manifests are .toml or .json files")
        return path
    builtin = BUILTIN_MANIFESTS / f"{path.name}.toml"
    if path.suffix == "" and path.parent == Path(".") and builtin.is_file():
        return builtin
    raise ConfigError(
        f"{path}: no such label manifest; give a .toml/.json file or one of {', '.join(builtin_manifest_names())}"
    )


def _check_class_name(name: str) -> None:
    if name not in GLOBAL_CLASSES:
        raise ValueError(f"unknown global class {name!r}; use one of {', '.join(GLOBAL_CLASSES)}")


def _listing(values: list[int] | list[float]) -> str:
    """Comma-separated values, shortened to the first few."""
    shown = ", ".join(f"{v:g}" for v in values[:_MAX_LISTED])
    return shown + (f" (+{len(values) - _MAX_LISTED} more)" if len(values) > _MAX_LISTED else "")
