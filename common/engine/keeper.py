"""``last.pt`` and ``best.pt`` in one folder: the single rule for which model is kept, used by ``fed-eval train``
(per epoch) and the ServerApp (per round).

``last.pt`` follows every save whose weights are all finite; ``best.pt`` follows every save whose
:attr:`~fedseg.common.engine.checkpoint.CheckpointMeta.score` beats the stored one. A NaN or missing score never
does, and a model with a non-finite weight is never written at all, so a resumed run cannot continue from it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from fedseg.common.engine.checkpoint import CheckpointMeta, read_meta, save_checkpoint

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"


def is_better(score: float | None, best: float | None) -> bool:
    """Whether ``score`` beats ``best``: None or NaN never does; anything real beats "no best yet"."""
    if score is None or math.isnan(score):
        return False
    return best is None or score > best


def stored_score(path: Path) -> float | None:
    """The score recorded in a checkpoint's metadata (None when the file or the value is absent)."""
    if not path.is_file():
        return None
    value = read_meta(path).score
    return None if value is None or math.isnan(value) else float(value)


def last_round(folder: Path) -> int | None:
    """The round of ``folder/last.pt`` (None when there is no checkpoint yet)."""
    path = folder / LAST
    return read_meta(path).round if path.is_file() else None


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` holding a NaN or an infinity."""
    return [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


class CheckpointKeeper:
    """Keeps ``last.pt`` and ``best.pt`` in one folder.

    Args:
        folder: where the files live; an existing ``best.pt`` sets the score to beat (resumed runs).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.best = stored_score(folder / BEST)

    @property
    def last_path(self) -> Path:
        """Path of the latest model."""
        return self.folder / LAST

    @property
    def best_path(self) -> Path:
        """Path of the best model so far."""
        return self.folder / BEST

    def save(self, model: nn.Module, meta: CheckpointMeta, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Save ``model`` as ``last.pt`` (with ``optimizer`` state) and, if ``meta.score`` is a new best, as
        ``best.pt``. A model with non-finite weights is not saved (logged as an error).

        Returns:
            Whether this checkpoint became the new best.
        """
        bad = non_finite_tensors(model)
        if bad:
            log.error("not saving %s: non-finite values in %s", self.last_path, ", ".join(bad[:3]))
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.last_path, model, meta, optimizer)
        if not is_better(meta.score, self.best):
            return False
        save_checkpoint(self.best_path, model, meta)
        log.debug("new best score %.4f (was %s) in %s", meta.score, self.best, self.best_path)
        self.best = meta.score
        return True
