"""Checkpoints: weights plus everything needed to reuse them (model, classes, preprocessing, provenance).

A checkpoint is one ``torch.save`` file holding plain tensors and JSON-like metadata, so it loads with
``weights_only=True``. It is written to a temporary file next to the target and moved into place with
``os.replace``, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.errors import DataError, IncompatibleModelError
from fedseg.common.nn.model import ModelConfig, build_model

log = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch puts terminal bold codes into some messages

FORMAT = "fedseg-checkpoint"
FORMAT_VERSION = 1


def fedseg_version() -> str:
    """The installed fedseg version, or "unknown" when running from a source tree that is not installed."""
    try:
        return importlib.metadata.version("fedseg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def config_hash(*, model: ModelConfig, preprocess: PreprocessConfig) -> str:
    """A short, stable fingerprint of what the weights mean: the model and preprocessing configs (sha256 of their
    sorted JSON, 16 hex digits). Training settings are left out: a resumed run may change them."""
    payload = json.dumps({"model": model.model_dump(mode="json"), "preprocess": preprocess.model_dump(mode="json")})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def changed_settings(meta: CheckpointMeta, model: ModelConfig, preprocess: PreprocessConfig) -> list[str]:
    """``section.field`` names where ``model`` / ``preprocess`` differ from what ``meta`` was trained with
    (empty when the config hashes agree)."""
    if meta.config_hash == config_hash(model=model, preprocess=preprocess):
        return []
    pairs = (("model", meta.model, model), ("preprocess", meta.preprocess, preprocess))
    return [
        f"{section}.{name}"
        for section, old, new in pairs
        for name in type(new).model_fields
        if getattr(old, name) != getattr(new, name)
    ]


class CheckpointMeta(BaseModel):
    """Everything about a checkpoint except the weights.

    The preprocessing config carries the target spacing and the intensity normalisation, so prediction
    reproduces the training input exactly; ``config_hash`` fingerprints the model and preprocessing configs
    (see :func:`config_hash`), so a resume can refuse weights trained with other settings. ``score`` is what
    ``best.pt`` is chosen by (:mod:`~fedseg.common.engine.keeper`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig
    class_names: tuple[str, ...]
    preprocess: PreprocessConfig
    patch_size: tuple[int, int, int] = Field(description="training patch (D, H, W); the inference window")
    config_hash: str
    seed: int
    metrics: dict[str, float] = Field(default_factory=dict)
    score: float | None = Field(default=None, description="higher is better; chooses best.pt")
    fedseg_version: str = Field(default_factory=fedseg_version)
    epoch: int | None = None
    round: int | None = None


class LoadedCheckpoint(NamedTuple):
    """A model rebuilt from a checkpoint (on the CPU, in eval mode) and its metadata."""

    model: nn.Module
    meta: CheckpointMeta


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: CheckpointMeta,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write weights, metadata and (optionally) optimiser state atomically.

    Args:
        path: target file, conventionally ``*.pt``; parent folders are created.
        model: the network whose ``state_dict`` is saved (moved to CPU in the file).
        meta: metadata; ``meta.model`` must describe ``model``.
        optimizer: saved too when given, so training can resume.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta.model_dump(mode="json"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.debug("saved checkpoint %s", path)
    return path


def _read_payload(path: Path) -> dict[str, Any]:
    """Load and sanity-check the raw file; every failure is a one-line DataError naming the file."""
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; pass the .pt file written by fed-eval train")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise DataError(
                f"{path} is not a readable fedseg checkpoint (not a PyTorch .pt file, or a damaged one); "
                "pass a .pt written by fed-eval train or fed-server"
            ) from err
        raise DataError(
            f"{path} is not a fedseg checkpoint: it holds Python objects other than tensors and plain data, "
            "which fedseg never loads; pass a .pt written by fed-eval train or fed-server"
        ) from None
    except Exception as err:  # torch raises many types for foreign or truncated files
        raise DataError(f"{path} is not a readable fedseg checkpoint ({_first_line(err)})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{path} is not a fedseg checkpoint (no '{FORMAT}' header)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has checkpoint format {payload.get('format_version')}, this fedseg reads {FORMAT_VERSION}"
        )
    return payload


def read_meta(path: str | Path) -> CheckpointMeta:
    """Read only the metadata of a checkpoint.

    Raises:
        DataError: the file is missing, unreadable or not a fedseg checkpoint.
    """
    path = Path(path)
    return _meta_of(path, _read_payload(path))


def _meta_of(path: Path, payload: dict[str, Any]) -> CheckpointMeta:
    try:
        return CheckpointMeta.model_validate(payload["meta"])
    except (KeyError, ValidationError) as err:
        raise DataError(f"{path} has invalid checkpoint metadata; re-save it with this fedseg version") from err


def _describe(cfg: ModelConfig, classes: Sequence[str]) -> str:
    return (
        f"arch={cfg.arch} in_channels={cfg.in_channels} n_classes={cfg.n_classes} "
        f"feature_scale={cfg.feature_scale} classes={','.join(classes)}"
    )


def _check_expected(
    path: Path, meta: CheckpointMeta, expect: ModelConfig | None, classes: Sequence[str] | None
) -> None:
    # gate_init only affects initialisation, never the shape of the weights, so it may differ.
    fields = ("arch", "in_channels", "n_classes", "feature_scale")
    model_differs = expect is not None and any(getattr(expect, f) != getattr(meta.model, f) for f in fields)
    classes_differ = classes is not None and tuple(classes) != meta.class_names
    if model_differs or classes_differ:
        asked = _describe(expect or meta.model, classes if classes is not None else meta.class_names)
        raise IncompatibleModelError(
            f"{path} holds {_describe(meta.model, meta.class_names)} but {asked} was asked for"
        )


def load_checkpoint(
    path: str | Path,
    expect: ModelConfig | None = None,
    classes: Sequence[str] | None = None,
) -> LoadedCheckpoint:
    """Rebuild the model stored in a checkpoint.

    Args:
        path: a file written by :func:`save_checkpoint`.
        expect: the architecture the caller needs; a different one raises.
        classes: the class names the caller needs, background first; different ones raise.

    Returns:
        The model (CPU, eval mode, weights loaded) and its metadata.

    Raises:
        DataError: the file is missing, unreadable or not a fedseg checkpoint.
        IncompatibleModelError: the stored model or classes differ from ``expect`` / ``classes``,
            or the weights do not fit the stored architecture.
    """
    path = Path(path)
    payload = _read_payload(path)
    meta = _meta_of(path, payload)
    _check_expected(path, meta, expect, classes)
    model = build_model(meta.model)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise IncompatibleModelError(
            f"{path}: weights do not fit {_describe(meta.model, meta.class_names)} ({first})"
        ) from err
    model.eval()
    return LoadedCheckpoint(model=model, meta=meta)


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer) -> bool:
    """Restore optimiser state saved with a checkpoint (to resume training).

    Returns:
        True when state was found and loaded, False when the checkpoint holds none.

    Raises:
        DataError: the file is not a fedseg checkpoint.
        IncompatibleModelError: the saved state does not fit ``optimizer``'s parameters.
    """
    path = Path(path)
    state = _read_payload(path).get("optimizer")
    if state is None:
        return False
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as err:
        raise IncompatibleModelError(f"{path}: optimiser state does not fit this model ({err})") from err
    return True


def _first_line(err: BaseException) -> str:
    """The whole first line of an exception message without terminal codes, or the exception's type."""
    text = _ANSI.sub("", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__
