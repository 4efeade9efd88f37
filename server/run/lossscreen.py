"""A reference the server trusts: every reply's model scored on a few fixed patches of the central validation set.

Screening relative to the round's median cannot tell, among two hospitals, which one is lying, and a careful liar
keeps its update's norm and direction honest-looking. The server holds clean labelled data of its own (the central
validation set), so it can ask the one question that matters: does this reply's model do far worse than the
others on clean data? Each round the screen

* crops one fixed patch (the validation patch size) per screening case, centred on the case's labelled organs;
* scores each reply's model (the global weights with that reply's weights and BatchNorm statistics laid over them,
  in eval mode) by the mean voxel cross-entropy on those patches, counting only voxels of the classes the replying
  site annotates (background always): a partially labelled site is not punished for the organs it was never
  taught;
* rejects a reply whose loss is non-finite or more than ``max_loss_ratio`` × the round's reference: the upper
  median of the global model's loss and every reply's (:meth:`LossScreen.reference`).

Cross-entropy, not Dice: a random initial model and a wrecked one both have Dice near 0, but a model whose weights
were multiplied by 100 is confidently wrong and its cross-entropy explodes (about 3e13, or an overflow, against 14
for an honest reply in ``tests/server/run/test_screening.py``). The screen is for models that are *far* worse, two
orders of magnitude by default, because honest cross-entropies spread widely: sites train with the Dice loss,
which leaves their probabilities uncalibrated, so after a few steps from a random start an honest model's
cross-entropy was 20 × the (uniform) initial model's, and 40 × that of an attacker's update built from the honest
ones ("a little is enough" in ``bench/robustness.py``). That is also why the reference is a median that includes
the global model and not the best reply: with the best reply as reference, that attacker's low-loss model got both
honest sites rejected. A liar can move the upper median only by being one of the larger half, so it cannot lower
the bar under the honest sites by sending a well-calibrated model. The cost is one forward pass per patch per reply
on the server (``bench/robustness.py`` prints it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.data.sampling import crop_padded
from fedseg.common.fl.protocol import annotated_of
from fedseg.server.run.replies import Rejected
from fedseg.server.run.screen import Kept, Screened
from fedseg.server.run.spill import Spill

log = logging.getLogger(__name__)

NDArray = np.ndarray


@dataclass(frozen=True)
class ScreenPatch:
    """One screening patch: the image ``(1, 1, D, H, W)`` and its labels ``(1, D, H, W)``."""

    image: torch.Tensor
    label: torch.Tensor


def screen_patches(cases: Sequence[PreparedCase], patch: Sequence[int], count: int) -> list[ScreenPatch]:
    """One patch of size ``patch`` from each of the first ``count`` labelled cases, centred on its foreground
    (the volume's centre when it has none); padded with the image minimum and background where it overhangs."""
    out = []
    for case in [c for c in cases if c.label is not None][:count]:
        assert case.label is not None
        foreground = np.argwhere(case.label > 0)
        centre = foreground.mean(axis=0) if len(foreground) else np.asarray(case.label.shape) / 2
        start = [round(float(c)) - n // 2 for c, n in zip(centre, patch, strict=True)]
        image = crop_padded(case.image, start, patch, float(case.image.min()))
        label = crop_padded(case.label, start, patch, 0)
        out.append(ScreenPatch(torch.from_numpy(image)[None, None], torch.from_numpy(label.astype(np.int64))[None]))
    return out


def masked_cross_entropy(logits: torch.Tensor, label: torch.Tensor, annotated: Sequence[bool] | None) -> float:
    """Mean voxel cross-entropy over the voxels whose class is in ``annotated`` (None: every class); NaN when there
    is no such voxel, infinite when the logits overflow."""
    losses = functional.cross_entropy(logits.float(), label, reduction="none")
    if annotated is not None:
        flags = torch.tensor(list(annotated), dtype=torch.bool)
        keep = flags[label.clamp(max=len(flags) - 1)]
        losses = losses[keep]
    if not losses.numel():
        return math.nan  # no voxel of the site's classes here
    value = float(losses.mean())
    return value if math.isfinite(value) else math.inf  # overflowing logits give NaN: a wrecked model


class LossScreen:
    """Scores models on the screening patches and rejects replies far worse than the global model.

    Args:
        patches: :func:`screen_patches`.
        model: an instance of the federation's model (weights are loaded into it).
        max_ratio: reject a reply whose loss exceeds this × the round's reference (:meth:`reference`).
    """

    def __init__(self, patches: Sequence[ScreenPatch], model: nn.Module, max_ratio: float) -> None:
        if not patches:
            raise ValueError("the loss screen needs at least one labelled validation case")
        self.patches = list(patches)
        self.model = model
        self.max_ratio = max_ratio

    def loss(self, state: Mapping[str, NDArray], annotated: Sequence[bool] | None = None) -> float:
        """The mean masked cross-entropy of the model with weights ``state`` over the patches."""
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
        self.model.load_state_dict(tensors)
        self.model.eval()
        with torch.no_grad():
            values = [masked_cross_entropy(self.model(p.image), p.label, annotated) for p in self.patches]
        finite = [v for v in values if not math.isnan(v)]
        if not all(math.isfinite(v) for v in finite):
            return math.inf
        return float(np.mean(finite)) if finite else math.nan

    @staticmethod
    def reference(losses: Sequence[float]) -> float:
        """The round's reference: the upper median of the finite ``losses`` (the global model's and each reply's);
        infinite when none is finite."""
        finite = sorted(v for v in losses if math.isfinite(v))
        return finite[len(finite) // 2] if finite else math.inf

    def problem(self, loss: float, reference: float) -> str | None:
        """Why a reply with ``loss`` is rejected against the round's ``reference`` loss, or None."""
        if math.isnan(loss) or math.isnan(reference):
            return None  # no voxel of the site's classes in the patches: nothing to compare
        if not math.isfinite(loss):
            return "its model's loss on the server's screening data is not finite"
        if loss > self.max_ratio * reference:
            return (
                f"its model's loss on the server's screening data is {loss:.4g}, "
                f"{loss / reference:.3g} x the round's median {reference:.4g} (max_loss_ratio {self.max_ratio:g})"
            )
        return None


def screen_replies(
    screen: LossScreen, reference: Mapping[str, NDArray], screened: Screened, spill: Spill, run_round: int
) -> list[Kept]:
    """The replies of ``screened`` whose model is not far worse than the round's median on the screening data
    (the others appended to ``screened.rejected``, with their reason logged), each with its screening loss.

    Args:
        reference: the round's global weights (each reply's aggregated weights from ``spill`` and its small
            arrays are laid over them).
    """
    if not screened.kept:
        return screened.kept
    started = time.perf_counter()
    flags = [annotated_of(k.reply.message.content) for k in screened.kept]
    losses = [
        screen.loss({**reference, **spill.load(k.row), **k.reply.arrays}, f)
        for k, f in zip(screened.kept, flags, strict=True)
    ]
    global_loss = screen.loss(reference)
    bar = screen.reference([global_loss, *losses])
    kept = []
    for k, loss in zip(screened.kept, losses, strict=True):
        problem = screen.problem(loss, bar)
        if problem is None:
            kept.append(dataclasses.replace(k, screen_loss=loss))
            continue
        screened.rejected.append(Rejected(k.reply.node, k.reply.site, problem))
        log.warning("round %d: rejected the reply of %s (node %d): %s", run_round, k.reply.site, k.reply.node, problem)
    log.info(
        "round %d: loss screen in %.1f s: %s (the global model's %.4g)",
        run_round,
        time.perf_counter() - started,
        ", ".join(f"{k.reply.site} {v:.4g}" for k, v in zip(screened.kept, losses, strict=True)),
        global_loss,
    )
    return kept
