"""How much each accepted reply counts: the one aggregation weight used everywhere a weight is used.

A site's case count is its own claim. Weighted by it as declared, a site that claims 100000 cases owns the
FedAvg model (its share of the update is 100000 / (100000 + the honest cases)). So the weight is decided here,
once per round, and every place that weights replies uses it: the FedAvg/FedProx mean, the mean FedAdam/FedYogi
start from, the BatchNorm statistics pooled under every rule, the class-aware head rows and Flower's own weighted
averages (multi-krum), which read it from the reply metrics the strategy hands them.

``strategy.weighting``:

* ``cases``: the declared cases, as FedAvg (McMahan et al. 2017) defines it. Only safe when every site's count is
  pinned by the operator (``cases = N`` in ``sites.toml``): a pinned site declaring more is rejected before this.
* ``equal``: every reply counts 1.
* ``capped`` (default): the declared cases, but no site above ``max_weight_ratio`` × the round's low median of the
  declared cases (:func:`statistics.median_low`: with two sites the smaller one, so a liar cannot lift the
  median it is capped by). With the default ratio 2, a liar at the cap holds at most 2 / (n + 1) of the update
  among n sites of median size (2/3 with two sites, 1/2 with three, 1/3 with five) instead of all of it, while a
  site holding twice the median's cases still counts double.

A pinned site's weight is its pin (it is the operator's word), never capped.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from fedseg.server.config import Weighting

__all__ = ["Weighting", "aggregation_weights", "pin_problem", "shares"]


def aggregation_weights(
    cases: Sequence[int],
    weighting: Weighting,
    max_ratio: float,
    pinned: Sequence[bool] | None = None,
) -> list[float]:
    """Each reply's aggregation weight (module docstring), in the order of ``cases``.

    Args:
        cases: the declared training cases of the round's accepted replies (positive).
        weighting: the rule.
        max_ratio: ``capped``: the largest weight as a multiple of the low median of ``cases``.
        pinned: which replies' cases the operator pinned (never capped); None: none.
    """
    if not cases:
        return []
    if weighting == "equal":
        return [1.0] * len(cases)
    if weighting == "cases":
        return [float(c) for c in cases]
    fixed = list(pinned) if pinned is not None else [False] * len(cases)
    cap = max_ratio * statistics.median_low(cases)
    return [float(c) if is_pinned else min(float(c), cap) for c, is_pinned in zip(cases, fixed, strict=True)]


def shares(weights: Sequence[float]) -> list[float]:
    """The weights normalised to sum to 1 (each reply's share of the aggregate)."""
    total = sum(weights)
    return [w / total for w in weights]


def pin_problem(site: str, declared: int, pins: Mapping[str, int]) -> str | None:
    """Why a reply of ``site`` declaring ``declared`` cases is refused by the operator's pin, or None."""
    pin = pins.get(site)
    if pin is not None and declared > pin:
        return f"num-examples {declared} exceeds the {pin} cases pinned for site {site!r} in sites.toml"
    return None
