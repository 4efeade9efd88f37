"""Central validation of the global model: the validation set is preprocessed once (cached), then scored each round."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from fedseg.common.data.manifest import site_manifest
from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.data.sitecache import prepare_labelled
from fedseg.common.engine.device import resolve_device
from fedseg.common.engine.validation import class_names_for, validate
from fedseg.server.config import ServerConfig

log = logging.getLogger(__name__)


class CentralValidator:
    """Dice per organ of a model on the server's validation set (sliding window over whole volumes).

    Args:
        cfg: server configuration; ``cfg.validation.data`` must be set.
        cache_dir: where the preprocessed cases are cached (reused across rounds and resumed runs).

    Raises:
        DataError: the folder holds no labelled case.
    """

    def __init__(self, cfg: ServerConfig, cache_dir: Path) -> None:
        if cfg.validation.data is None:
            raise ValueError("CentralValidator needs cfg.validation.data")
        manifest = site_manifest(cfg.validation.data, cfg.validation.labels)
        labelled = prepare_labelled(
            cfg.validation.data, manifest, cfg.preprocess, cache_dir, role="validation.data", use="validate on"
        )[: cfg.validation.max_cases]
        self.cases: list[PreparedCase] = labelled
        self.patch = cfg.validation_patch
        self.device = resolve_device(cfg.validation.device)
        self.class_names = class_names_for(cfg.model.n_classes)
        log.info("central validation: %d cases from %s", len(labelled), cfg.validation.data)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """``{"dice_<organ>": ..., "dice_mean": ...}`` of ``model`` on the validation cases."""
        return validate(model, self.cases, self.patch, self.device, self.class_names)
