"""The global model's checkpoints: ``last.pt`` after every round and ``best.pt`` by mean foreground Dice.

Both are written with :func:`fedseg.common.checkpoint.save_checkpoint` (temporary file + rename), and their
metadata records the round and the central Dice, so ``fed-server start --resume`` knows where to continue.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from torch import nn

from fedseg.common.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from fedseg.common.validation import MEAN_KEY

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"


def is_better(score: float, best: float | None) -> bool:
    """Whether ``score`` beats ``best``: NaN never does; anything real beats "no best yet"."""
    if math.isnan(score):
        return False
    return best is None or score > best


def stored_score(path: Path) -> float | None:
    """The mean Dice recorded in a checkpoint's metadata (None when the file or the value is absent)."""
    if not path.is_file():
        return None
    value = read_meta(path).metrics.get(MEAN_KEY)
    return None if value is None or math.isnan(value) else float(value)


def last_round(folder: Path) -> int | None:
    """The round of ``folder/last.pt`` (None when there is no checkpoint yet)."""
    path = folder / LAST
    return read_meta(path).round if path.is_file() else None


class GlobalCheckpoints:
    """Keeps ``last.pt`` and ``best.pt`` in one folder.

    Args:
        folder: where the files live; an existing ``best.pt`` sets the score to beat (resumed runs).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.best = stored_score(folder / BEST)

    @property
    def last_path(self) -> Path:
        """Path of the latest global model."""
        return self.folder / LAST

    @property
    def best_path(self) -> Path:
        """Path of the best global model so far."""
        return self.folder / BEST

    def save(self, model: nn.Module, meta: CheckpointMeta) -> bool:
        """Save ``model`` as the latest checkpoint and, if its mean Dice is a new best, as ``best.pt``.

        Returns:
            Whether this checkpoint became the new best.
        """
        save_checkpoint(self.last_path, model, meta)
        score = meta.metrics.get(MEAN_KEY, float("nan"))
        if not is_better(score, self.best):
            return False
        save_checkpoint(self.best_path, model, meta)
        log.info("round %s: new best mean Dice %.4f (was %s)", meta.round, score, self.best)
        self.best = score
        return True
