"""A site's settings (from the SuperNode's node-config) and its prepared training cases.

``fed-client join`` writes the node-config TOML once; every ClientApp process reads it back through
``context.node_config``. The preprocessed cases live in ``<workdir>/cache`` (fingerprinted by the
preprocessing config), so only the first round after a config change pays for preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import tomli_w
from pydantic import ConfigDict, Field, ValidationError

from fedseg.client.policy import SitePolicy, TaskCaps
from fedseg.common.data.manifest import SITE_MANIFEST, LabelManifest, site_manifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.device import DeviceName
from fedseg.common.errors import ConfigError, format_validation_error

log = logging.getLogger(__name__)

NODE_CONFIG_FILE = "node-config.toml"


class SiteConfig(TaskCaps):
    """Where a site's data is and how it trains; stored in the SuperNode's node-config.

    Besides the attributes below it holds the site policy's caps on a round's task (:class:`TaskCaps`:
    ``max_steps``, ``max_seconds``, ``max_patch_voxels`` ..., see :mod:`fedseg.client.policy`).

    Attributes:
        site: the site's name (reported to the server with its metrics).
        data: dataset folder (any layout ``fed-client check`` accepts).
        labels: label manifest file or built-in name; None = data already in global numbering.
        workdir: the site's private folder (cache, logs, Flower home).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str = Field(min_length=1)
    data: Path
    labels: str | None = None
    workdir: Path
    device: DeviceName = "cpu"

    @property
    def policy(self) -> SitePolicy:
        """The caps a round's task must fit (devices were checked when ``join`` started)."""
        return SitePolicy.model_validate(self.model_dump(include=set(TaskCaps.model_fields)))

    @property
    def cache_dir(self) -> Path:
        """Preprocessed-case cache."""
        return self.workdir / "cache"

    @property
    def log_dir(self) -> Path:
        """Logs of the SuperNode and the ClientApp processes."""
        return self.workdir / "logs"

    def manifest(self) -> LabelManifest:
        """The site's label manifest: ``labels``, else ``data/labels.toml``, else identity 1..4."""
        return site_manifest(self.data, self.labels)


def resolve_labels(data: Path, labels: str | None) -> str | None:
    """The manifest a site uses: ``labels`` (a file made absolute, or a built-in name), else
    ``data/labels.toml`` when it exists, else None (identity 1..4)."""
    if labels is not None:
        path = Path(labels)
        return str(path.resolve()) if path.is_file() else labels
    beside = data / SITE_MANIFEST
    return str(beside.resolve()) if beside.is_file() else None


def site_from_node_config(node_config: Mapping[str, object]) -> SiteConfig:
    """Read a :class:`SiteConfig` from a SuperNode's node-config.

    Raises:
        ConfigError: keys are missing or invalid (the SuperNode was not started by ``fed-client join``).
    """
    raw = {k: v for k, v in node_config.items() if v != ""}
    try:
        return SiteConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            f"node-config: {format_validation_error(err)}; start the SuperNode with fed-client join"
        ) from None


def write_node_config(site: SiteConfig, path: Path) -> Path:
    """Write the node-config TOML that ``flower-supernode --node-config`` reads (the site first, then its caps)."""
    caps = set(TaskCaps.model_fields)
    fields = sorted(site.model_dump().items(), key=lambda item: item[0] in caps)
    values = {k: str(v) for k, v in fields if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values), encoding="utf-8")
    return path


def load_training_cases(site: SiteConfig, preprocess: PreprocessConfig) -> list[PreparedCase]:
    """The site's labelled cases, preprocessed with ``preprocess`` (from the cache when possible).

    Raises:
        DataError: no labelled case is usable.
    """
    return prepare_labelled(
        site.data, site.manifest(), preprocess, site.cache_dir, role=f"site {site.site}", use="train on"
    )
