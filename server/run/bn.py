"""BatchNorm running statistics: averaged by case count, never given to a server optimiser or a robust rule.

A BatchNorm layer's ``running_mean``/``running_var`` describe the activations of a site's data, not a direction to
move in, so FedAdam/FedYogi must not treat them as pseudo-gradients (a variance then goes negative) and a
coordinate-wise median of variances is not a variance. Here each layer's statistics are pooled as if the sites'
activations were one population weighted by training cases (law of total variance)::

    mean = Σ w_i mean_i,        var = Σ w_i (var_i + (mean_i − mean)²),        w_i = cases_i / Σ cases

so the result is a valid (non-negative) variance. ``num_batches_tracked`` becomes the largest of the sites'
counts (it only matters when ``momentum=None``; any average of integer step counters is not a count).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

NDArray = np.ndarray
MEAN = "running_mean"
VAR = "running_var"
COUNT = "num_batches_tracked"
_SUFFIXES = (MEAN, VAR, COUNT)


def is_bn_statistic(key: str) -> bool:
    """Whether a state-dict key is a BatchNorm running statistic (mean, variance or step count)."""
    return key.rsplit(".", 1)[-1] in _SUFFIXES


def pooled_statistics(
    sites: Sequence[Mapping[str, NDArray]], cases: Sequence[int], reference: Mapping[str, NDArray]
) -> dict[str, NDArray]:
    """The pooled BatchNorm statistics of ``sites`` (module docstring), in ``reference``'s dtypes.

    Args:
        sites: each accepted site's arrays (all of the model's keys).
        cases: each site's training cases (the weights).
        reference: the global model's arrays (keys and dtypes).
    """
    weights = np.asarray(cases, dtype=np.float64)
    weights = weights / weights.sum()
    out: dict[str, NDArray] = {}
    for key, ref in reference.items():
        if not is_bn_statistic(key):
            continue
        prefix, suffix = key.rsplit(".", 1)
        if suffix == COUNT:
            out[key] = np.asarray(max(int(s[key]) for s in sites), dtype=ref.dtype).reshape(ref.shape)
            continue
        means = np.stack([s[f"{prefix}.{MEAN}"].astype(np.float64) for s in sites])
        mean = np.tensordot(weights, means, axes=1)
        if suffix == MEAN:
            out[key] = mean.astype(ref.dtype)
            continue
        variances = np.stack([s[key].astype(np.float64) for s in sites])
        var = np.tensordot(weights, variances + (means - mean) ** 2, axes=1)
        out[key] = var.astype(ref.dtype)
    return out
