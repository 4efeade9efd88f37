"""Cross-site validation at a site: score the global model on the site's own labelled cases, aggregates only.

Each organ is scored only on the cases that annotate it (the site's manifest): a site that does not label the
spleen has spleen voxels labelled 0, so no spleen Dice can be computed there. Per organ the reply carries the
mean, sample standard deviation and count of the per-case Dice and HD95 (mm, on the prepared grid); no per-case
value, image or label leaves the site. Keys: ``dice-<organ>-mean``, ``dice-<organ>-sd``, ``dice-<organ>-n`` and the
same for ``hd95``; a NaN mean or sd (fewer than 1 or 2 finite values) is left out, ``-n`` is always sent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.engine.inference import sliding_window_predict
from fedseg.common.engine.train import TimeLimit
from fedseg.common.engine.validation import class_names_for
from fedseg.common.eval.metrics import ClassMetrics, class_metrics, summarize
from fedseg.common.fl.protocol import CROSS_SITE_METRICS, metric_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scores:
    """What :func:`score_cases` measured: flat ``{key: value}`` (see the module docstring), ready for a Flower
    MetricRecord, over ``cases`` labelled cases (fewer than given when the time limit stopped it)."""

    scores: dict[str, float | int]
    cases: int


def score_cases(
    model: nn.Module,
    cases: Sequence[PreparedCase],
    patch: tuple[int, int, int],
    device: torch.device | str,
    time_limit: float | None = None,
) -> Scores:
    """Aggregate Dice and HD95 per annotated organ of ``model`` on ``cases`` (sliding window).

    Args:
        model: the global model.
        cases: the site's prepared, labelled cases (unlabelled ones are skipped).
        patch: sliding-window size.
        device: where the network runs.
        time_limit: seconds from the call to be done by: scoring stops before a case that, as long as the
            longest so far, would end past it (:class:`~fedseg.common.engine.train.TimeLimit`; the first case
            always runs). None: every case.
    """
    per_class: dict[int, list[ClassMetrics]] = {}
    n_classes = 0
    scored = 0
    limit = TimeLimit(time_limit)
    for case in cases:
        if case.label is None:
            continue
        if scored and limit.exhausted():
            log.info("scored %d cases: one more would pass the %g s time limit", scored, time_limit)
            break
        limit.mark()
        labels = sliding_window_predict(model, case.image, patch, device).labels
        n_classes = max(n_classes, len(case.annotated))
        spacing = case.source.prepared.spacing
        for c in range(1, len(case.annotated)):
            if case.annotated[c]:
                per_class.setdefault(c, []).append(class_metrics(labels == c, case.label == c, spacing))
        scored += 1
        limit.lap()
    names = class_names_for(n_classes) if n_classes else ()
    out: dict[str, float | int] = {}
    for c, results in sorted(per_class.items()):
        summary = summarize(results)
        for metric in CROSS_SITE_METRICS:
            stats = summary.metrics[metric]
            out[metric_key(metric, names[c], "n")] = stats.n
            for stat, value in (("mean", stats.mean), ("sd", stats.sd)):
                if not math.isnan(value):
                    out[metric_key(metric, names[c], stat)] = value
    return Scores(out, scored)
