"""Poisson sampling of cases: the privacy unit is the patient, so each DP-SGD step draws cases, not patches.

Each step every case enters independently with probability q (so a step may hold none, or all); the accountant's
amplification by subsampling holds only for this draw, with the q it is told. The draw must be secret from whoever
sees the result: a server that could repeat it would know which cases a step used. Its random numbers therefore come
from the operating system's entropy, never from the round's seed (which the server chooses).
"""

from __future__ import annotations

import secrets

import numpy as np


def secret_rng() -> np.random.Generator:
    """A numpy generator seeded from the operating system's entropy (nobody else can repeat its draws)."""
    return np.random.default_rng(secrets.randbits(128))


class PoissonCases:
    """Draws the cases of every DP-SGD step: each of ``cases`` independently with probability ``rate``.

    Args:
        cases: number of cases at the site.
        rate: the sample rate q in (0, 1].
        rng: the source of the draws (default: :func:`secret_rng`; tests pass a seeded one).

    Raises:
        ValueError: no cases, or a rate outside (0, 1].
    """

    def __init__(self, cases: int, rate: float, rng: np.random.Generator | None = None) -> None:
        if cases < 1 or not 0.0 < rate <= 1.0:
            raise ValueError(f"need at least one case and a rate in (0, 1], got {cases} cases and rate {rate}")
        self.cases = cases
        self.rate = rate
        self._rng = rng if rng is not None else secret_rng()

    def draw(self) -> list[int]:
        """The indices of the cases in the next step (sorted; possibly empty)."""
        return [int(i) for i in np.flatnonzero(self._rng.random(self.cases) < self.rate)]
