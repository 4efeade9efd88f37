"""The registry of public datasets: what each is, where its archive is, how to check and arrange it.

The built-in list is ``registry.toml`` next to this module; a ``--registry FILE`` of the same shape adds datasets
or overrides built-in ones key by key (a hospital's intranet mirror gives just ``url``). Giving ``md5`` or
``sha256`` in an override replaces both checksums of the entry it overrides, since a mirror may hold a repacked
archive. Every entry is validated here, at the edge: a bad file is one :class:`ConfigError` line naming it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedseg.common.data.manifest import GLOBAL_CLASSES, LabelManifest
from fedseg.common.errors import ConfigError, format_validation_error

#: The built-in registry file.
BUILTIN_REGISTRY = Path(__file__).parent / "registry.toml"

#: How an archive's files are arranged (see :mod:`fedseg.common.datasets.arrange`).
Layout = Literal["msd", "totalsegmentator", "kits"]

_CHECKSUM_KEYS = ("md5", "sha256")
_DIGITS = {"md5": 32, "sha256": 64}
_HEX = {name: re.compile(f"[0-9a-f]{{{digits}}}") for name, digits in _DIGITS.items()}
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


class InstitutionField(BaseModel):
    """Where a dataset says which institution each case comes from: a delimited table in the dataset folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str = Field(description="table file, relative to the fetched dataset folder")
    case_column: str = Field(description="column holding the case id")
    column: str = Field(description="column holding the institution")
    delimiter: str = ","


class DatasetEntry(BaseModel):
    """One dataset of the registry (``[datasets.NAME]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    title: str = ""
    organs: list[str] = Field(min_length=1)
    cases: int | None = Field(default=None, ge=1)
    size_bytes: int | None = Field(default=None, ge=1)
    licence: str
    citation: str = ""
    homepage: str = ""
    url: str | None = None
    md5: str | None = None
    sha256: str | None = None
    checksum_source: str = ""
    layout: Layout
    labels: dict[int, str] = Field(min_length=1)
    other_labels: Literal["error", "background"] = "error"
    masks: dict[int, str] = Field(default_factory=dict)
    institution: InstitutionField | None = None
    max_extract_bytes: int | None = Field(default=None, ge=1)
    fetch_hint: str = ""
    note: str = ""

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"dataset name {name!r} must be lower-case letters, digits, '.', '_' or '-'")
        return name

    @field_validator("organs")
    @classmethod
    def _check_organs(cls, organs: list[str]) -> list[str]:
        unknown = [o for o in organs if o not in GLOBAL_CLASSES[1:]]
        if unknown:
            raise ValueError(f"unknown organs {unknown}; use {', '.join(GLOBAL_CLASSES[1:])}")
        return organs

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"url {url!r} must start with http:// or https://")
        return url

    @field_validator("md5", "sha256")
    @classmethod
    def _check_hex(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        value, algorithm = value.strip().lower(), info.field_name or "md5"
        if not _HEX[algorithm].fullmatch(value):
            raise ValueError(f"{algorithm} must be {_DIGITS[algorithm]} hexadecimal digits")
        return value

    @model_validator(mode="after")
    def _check_layout_keys(self) -> DatasetEntry:
        if self.layout == "totalsegmentator" and set(self.masks) != set(self.labels):
            raise ValueError("a totalsegmentator layout needs one mask file name per label value (masks table)")
        try:
            self.manifest()  # the labels and organs must make a valid label manifest
        except ValidationError as err:
            raise ValueError(format_validation_error(err)) from None
        return self

    @property
    def checksum(self) -> tuple[str, str] | None:
        """``(algorithm, hex digest)`` to verify the archive by, SHA-256 before MD5; None when none is known."""
        if self.sha256:
            return "sha256", self.sha256
        if self.md5:
            return "md5", self.md5
        return None

    def manifest(self) -> LabelManifest:
        """The ``labels.toml`` of the fetched dataset: its label values, the organs it annotates."""
        return LabelManifest(site=self.name, labels=self.labels, annotated=self.organs, other_labels=self.other_labels)


def load_registry(extra: Path | None = None) -> dict[str, DatasetEntry]:
    """The built-in registry, with ``extra``'s entries added or merged over it.

    Raises:
        ConfigError: ``extra`` is missing, not TOML, or an entry is invalid (the message names the file and entry).
    """
    tables = _tables(BUILTIN_REGISTRY)
    if extra is not None:
        for name, override in _tables(extra).items():
            base = dict(tables.get(name, {}))
            if any(key in override for key in _CHECKSUM_KEYS):
                for key in _CHECKSUM_KEYS:
                    base.pop(key, None)
                base.pop("checksum_source", None)
            tables[name] = base | override
    where = f"{BUILTIN_REGISTRY} + {extra}" if extra is not None else str(BUILTIN_REGISTRY)
    return {name: _entry(name, table, where) for name, table in sorted(tables.items())}


def find_entry(registry: dict[str, DatasetEntry], name: str) -> DatasetEntry:
    """The entry called ``name``.

    Raises:
        ConfigError: no such dataset (the message lists the known names).
    """
    if name not in registry:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(registry)} (or add it with --registry FILE)")
    return registry[name]


def _tables(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the registry ({err.strerror or err}); check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None
    datasets = data.get("datasets")
    extra = sorted(set(data) - {"datasets"})
    if not isinstance(datasets, dict) or extra or not all(isinstance(t, dict) for t in datasets.values()):
        raise ConfigError(f"{path}: a registry holds only [datasets.NAME] tables (url, md5 or sha256, organs, ...)")
    return datasets


def _entry(name: str, table: dict[str, Any], where: str) -> DatasetEntry:
    try:
        return DatasetEntry.model_validate({**table, "name": name})
    except ValidationError as err:
        raise ConfigError(f"{where}: datasets.{name}: {format_validation_error(err)}") from None
