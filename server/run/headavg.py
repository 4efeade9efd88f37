"""Class-aware averaging of the output head for partially labelled sites.

The output layers of both networks hold one row per class: the four deep-supervision 1×1×1 convolutions and the
final 1×1×1 convolution that fuses them (:data:`HEAD_LAYERS`). A site that does not annotate class ``c`` has no
say about what ``c`` looks like, so row ``c`` of these layers is averaged only over the sites that annotate
``c``, weighted by their aggregation weights (:mod:`fedseg.server.run.weighting`); the background row over every
site. A class that no site in the round
annotates keeps the previous global row. Everything else stays as the strategy aggregated it (FedAvg).

:func:`class_aware_head` is a pure function on numpy arrays; :func:`head_of_accepted` is the few lines that read
the strategy's validated replies. A site declares its classes in its reply (``annotated`` in the ``site``
ConfigRecord, see :mod:`fedseg.common.fl.protocol`); when one reply does not, the aggregate is left unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from fedseg.common.fl.protocol import annotated_of

log = logging.getLogger(__name__)

#: State-dict prefixes of the layers whose first axis is the class (weights and biases).
HEAD_LAYERS = ("dsv1", "dsv2.dsv.0", "dsv3.dsv.0", "dsv4.dsv.0", "final")


@dataclass(frozen=True)
class SiteHead:
    """One site's trained weights, aggregation weight and annotated classes (background first, always True)."""

    arrays: Mapping[str, np.ndarray]
    weight: float
    annotated: Sequence[bool]


def head_keys(keys: Sequence[str] | set[str]) -> list[str]:
    """The weight and bias keys of :data:`HEAD_LAYERS` among ``keys``, sorted."""
    wanted = {f"{layer}.{part}" for layer in HEAD_LAYERS for part in ("weight", "bias")}
    return sorted(k for k in keys if k in wanted)


def class_aware_head(
    aggregated: Mapping[str, np.ndarray], previous: Mapping[str, np.ndarray], sites: Sequence[SiteHead]
) -> dict[str, np.ndarray]:
    """Replace every head row of ``aggregated`` by the weighted mean over the sites that annotate its class.

    Args:
        aggregated: the strategy's new global weights (all keys).
        previous: the global weights the round started from (used for classes no site annotates).
        sites: the sites whose replies were aggregated.

    Returns:
        A new dict: ``aggregated`` with the head rows replaced (other entries are the same objects).

    Raises:
        ValueError: no sites, or a site whose annotated flags do not match the head's class count.
    """
    if not sites:
        raise ValueError("class-aware head averaging needs at least one site")
    out = dict(aggregated)
    for key in head_keys(set(aggregated)):
        n_classes = aggregated[key].shape[0]
        if any(len(site.annotated) != n_classes for site in sites):
            raise ValueError(f"{key} has {n_classes} class rows but a site declares {len(sites[0].annotated)} classes")
        rows = np.array(aggregated[key], copy=True)
        for c in range(n_classes):
            voters = [s for s in sites if c == 0 or s.annotated[c]]
            if not voters:
                rows[c] = previous[key][c]
                continue
            weights = np.array([s.weight for s in voters], dtype=np.float64)
            stacked = np.stack([np.asarray(s.arrays[key][c], dtype=np.float64) for s in voters])
            rows[c] = np.tensordot(weights / weights.sum(), stacked, axes=1).astype(rows.dtype)
        out[key] = rows
    return out


def head_of_accepted(
    merged: Mapping[str, np.ndarray],
    previous: Mapping[str, np.ndarray],
    replies: Sequence[tuple[Mapping[str, np.ndarray], float, Message]],
) -> dict[str, np.ndarray]:
    """:func:`class_aware_head` on validated replies ``(arrays, weight, message)``: the new head rows, or ``{}``
    (``merged`` unchanged) unless every reply names its classes and some site leaves a class unannotated."""
    sites = []
    for arrays, weight, message in replies:
        annotated = annotated_of(message.content)
        if annotated is None:
            return {}
        sites.append(SiteHead({k: arrays[k] for k in head_keys(set(arrays))}, weight, annotated))
    if not sites or all(all(s.annotated) for s in sites):
        return {}  # every site annotates every class: FedAvg already is the class-aware average
    keys = head_keys(set(merged))
    new = class_aware_head({k: merged[k] for k in keys}, {k: previous[k] for k in keys}, sites)
    log.info("class-aware head: rows of %d classes averaged over their annotating sites", len(sites[0].annotated))
    return new
