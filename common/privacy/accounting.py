"""The privacy accountant: Opacus's Rényi-DP accountant (Mironov 2017; subsampled Gaussian, Mironov et al. 2019).

A site's spending is a history of ``(noise_multiplier, sample_rate, steps)`` entries, exactly the state Opacus's
:class:`~opacus.accountants.RDPAccountant` keeps; RDP composes by addition, so ε after any number of rounds, runs
and restarts is computed from the concatenated history at the end. Plain numbers make the history easy to persist
(:mod:`fedseg.client.budget`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

#: One accountant entry: (noise multiplier, sample rate, steps taken with both).
Step = tuple[float, float, int]


def sample_rate(expected_batch: int, cases: int) -> float:
    """The Poisson rate q at which every case enters a step: ``expected_batch / cases``, at most 1.

    Raises:
        ValueError: no cases, or an expected batch below 1.
    """
    if cases < 1 or expected_batch < 1:
        raise ValueError(f"need at least one case and a batch of one, got {cases} cases and batch {expected_batch}")
    return min(1.0, expected_batch / cases)


def epsilon(history: Sequence[Step], delta: float) -> float:
    """ε at ``delta`` after every step in ``history`` (0 for an empty history)."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": ε is then an upper bound still
        return float(accountant.get_epsilon(delta=delta))


def noise_for(target_epsilon: float, delta: float, rate: float, steps: int) -> float:
    """The noise multiplier that spends at most ``target_epsilon`` (at ``delta``) in ``steps`` steps at ``rate``
    (Opacus's binary search, to within 0.01 of ε)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate, steps=steps)
        )


def extended(history: Sequence[Step], step: Step) -> list[Step]:
    """``history`` followed by ``step``, merged into the last entry when noise and rate are the same."""
    out = list(history)
    if step[2] <= 0:
        return out
    if out and out[-1][:2] == step[:2]:
        out[-1] = (step[0], step[1], out[-1][2] + step[2])
    else:
        out.append(step)
    return out
