"""BatchNorm running statistics: averaged by case count, never given to a server optimiser or a robust rule.

A BatchNorm layer's ``running_mean``/``running_var`` describe the activations of a site's data, not a direction to
move in, so FedAdam/FedYogi must not treat them as pseudo-gradients (a variance then goes negative) and a
coordinate-wise median of variances is not a variance. Here each layer's statistics are pooled as if the sites'
activations were one population weighted by training cases (law of total variance)::

    mean = Σ w_i mean_i,        var = Σ w_i (var_i + (mean_i − mean)²),        w_i = cases_i / Σ cases

so the result is a valid (non-negative) variance. The weights ``w_i`` are the replies' aggregation weights
(:mod:`fedseg.server.run.weighting`), never the raw declared cases. Under a robust rule the statistics are pooled
robustly too: ``median`` takes the coordinate-wise median of the means and of ``var_i + (mean_i − mean)²`` (a
median of non-negative numbers, so still a valid variance), ``trimmed`` the same with ``trim`` cut at each end;
one site raising every ``running_var`` then moves nothing while the others agree. ``num_batches_tracked`` becomes
the largest of the sites' counts (it only matters when ``momentum=None``; any average of integer step counters is
not a count).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from scipy import stats

NDArray = np.ndarray
MEAN = "running_mean"
VAR = "running_var"
COUNT = "num_batches_tracked"
_SUFFIXES = (MEAN, VAR, COUNT)
Pooling = Literal["mean", "median", "trimmed"]


def is_bn_statistic(key: str) -> bool:
    """Whether a state-dict key is a BatchNorm running statistic (mean, variance or step count)."""
    return key.rsplit(".", 1)[-1] in _SUFFIXES


def pooled_statistics(
    sites: Sequence[Mapping[str, NDArray]],
    weights: Sequence[float],
    reference: Mapping[str, NDArray],
    pooling: Pooling = "mean",
    trim: float = 0.2,
) -> dict[str, NDArray]:
    """The pooled BatchNorm statistics of ``sites`` (module docstring), in ``reference``'s dtypes.

    Args:
        sites: each accepted site's arrays (all of the model's keys).
        weights: each site's aggregation weight (``mean`` pooling only).
        reference: the global model's arrays (keys and dtypes).
        pooling: ``mean`` (weighted, law of total variance), ``median`` or ``trimmed`` (robust rules).
        trim: ``trimmed``: the fraction cut at each end.
    """
    out: dict[str, NDArray] = {}
    for key, ref in reference.items():
        if not is_bn_statistic(key):
            continue
        prefix, suffix = key.rsplit(".", 1)
        if suffix == COUNT:
            out[key] = np.asarray(max(int(s[key]) for s in sites), dtype=ref.dtype).reshape(ref.shape)
            continue
        means = np.stack([s[f"{prefix}.{MEAN}"].astype(np.float64) for s in sites])
        mean = _centre(means, weights, pooling, trim)
        if suffix == MEAN:
            out[key] = mean.astype(ref.dtype)
            continue
        spreads = np.stack([s[key].astype(np.float64) for s in sites]) + (means - mean) ** 2
        out[key] = _centre(spreads, weights, pooling, trim).astype(ref.dtype)
    return out


def _centre(stacked: NDArray, weights: Sequence[float], pooling: Pooling, trim: float) -> NDArray:
    """The sites' weighted mean, coordinate-wise median or trimmed mean along the first axis."""
    if pooling == "median":
        return np.asarray(np.median(stacked, axis=0))
    if pooling == "trimmed":
        return np.asarray(stats.trim_mean(stacked, trim, axis=0))
    factors = np.asarray(weights, dtype=np.float64)
    return np.asarray(np.tensordot(factors / factors.sum(), stacked, axes=1))
