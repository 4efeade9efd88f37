"""Client-level differential privacy (``privacy.mode = "client-dp"``) through Flower's own wrapper.

Flower's :class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping` wraps our
:class:`~fedseg.server.run.strategy.RecordingStrategy`: every site's update is clipped to ``update_clip_norm`` as the
replies arrive (before our screens see them), our strategy screens and averages them with equal weights, and
Gaussian noise of standard deviation ``noise_multiplier × update_clip_norm / min_sites`` is added to the mean
(McMahan et al. 2018). What this protects is a *site's* participation, not a patient's: with 3-10 sites the noise
on a mean of a few updates is large, which is why patient-level DP-SGD (``dp-sgd``) is the mode for hospitals.

Two things Flower's wrapper leaves to us:

* **The accountant.** Flower's own accounting mode requires the wrapped strategy to be a plain FedAvg, which ours
  is not; so the run keeps a :class:`flwr.supercore.privacy_accounting.rdp_accountant.RdpAccountant` itself (no
  amplification by sampling: every round is counted in full). It composes one Gaussian release per round that
  replaced the global model, its state is saved with the strategy state (a ``--resume`` continues counting) and the
  cumulative ε is written as every accepted site's ``epsilon``. With ``privacy.epsilon`` set, the noise multiplier
  is the smallest that keeps ``rounds`` releases within it.
* **The noise's randomness.** The wrapper draws from numpy's global generator, which the server seeds for
  reproducible training (FLTrust's reference update, for one): predictable noise is no noise. It is reseeded from
  the operating system's entropy before every release.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as AccountingConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedseg.common.privacy.config import PrivacyConfig
from fedseg.server.run.strategy import RecordingStrategy

log = logging.getLogger(__name__)

#: Noise multipliers searched for an ε target (the upper end spends almost nothing per round).
_NOISE_RANGE = (0.05, 1000.0)


def accountant_for(privacy: PrivacyConfig, sites: int) -> RdpAccountant:
    """An empty client-level accountant: ``sites`` sites, each round counted without sampling amplification."""
    config = AccountingConfig(
        target_delta=privacy.delta,
        population_size=sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    return RdpAccountant(config)


def epsilon_after(noise: float, releases: int, privacy: PrivacyConfig, sites: int) -> float:
    """The client-level ε at ``privacy.delta`` after ``releases`` rounds with ``noise``."""
    accountant = accountant_for(privacy, sites)
    accountant.compose(GaussianPrivacyEvent(noise, sites, sites), count=releases)
    return float(accountant.get_epsilon(privacy.delta))


def noise_for(epsilon: float, releases: int, privacy: PrivacyConfig, sites: int) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ``releases`` rounds stay within ``epsilon``.

    Raises:
        ValueError: even the largest multiplier searched spends more than ``epsilon``.
    """
    low, high = _NOISE_RANGE
    if epsilon_after(high, releases, privacy, sites) > epsilon:
        raise ValueError(f"privacy.epsilon = {epsilon:g} over {releases} rounds needs more noise than {high:g}")
    while high / low > 1.001:
        middle = (low * high) ** 0.5
        low, high = (middle, high) if epsilon_after(middle, releases, privacy, sites) > epsilon else (low, middle)
    return high


class ClientLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP around ``recording``, with a run-long accountant (module docstring).

    Args:
        recording: the run's strategy; its saved accountant state (``recording.accountant_state``, from a resumed
            run) is continued.
        privacy: the federation's ``[privacy]`` table (``mode = "client-dp"``).
        sites: the sites every round averages (``min_sites``; the noise is calibrated to a mean of that many).
        rounds: the run's rounds (the ε target's horizon).
    """

    def __init__(self, recording: RecordingStrategy, privacy: PrivacyConfig, sites: int, rounds: int) -> None:
        noise = (
            privacy.noise_multiplier if privacy.epsilon is None else noise_for(privacy.epsilon, rounds, privacy, sites)
        )
        super().__init__(recording, noise, privacy.update_clip_norm, sites)
        self.recording = recording
        self.privacy = privacy
        self.budget = accountant_for(privacy, sites)
        if recording.accountant_state:
            self.budget.load_state_dict(recording.accountant_state)
        log.info(
            "client-level DP: updates clipped to %g, noise multiplier %.4g over a mean of %d sites; ε so far %.4g",
            privacy.update_clip_norm,
            noise,
            sites,
            self.epsilon,
        )

    @property
    def epsilon(self) -> float:
        """The cumulative client-level ε at the configured δ (0 before the first release)."""
        return float(self.budget.get_epsilon(self.privacy.delta)) if self.budget.num_releases else 0.0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's clipping, our aggregation, Flower's noise; then the release is counted and recorded."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics  # no release: the global model stays, nothing is spent
        sites = self.num_sampled_clients
        self.budget.compose(GaussianPrivacyEvent(self.noise_multiplier, sites, sites))
        self.recording.accountant_state = self.budget.state_dict()
        epsilon = self.epsilon
        stats = self.recording.stats.get(server_round)
        if stats is not None:
            stats.sites = [s.model_copy(update={"epsilon": epsilon, "delta": self.privacy.delta}) for s in stats.sites]
        log.info("round %d: client-level DP release; ε = %.4g at δ = %g", server_round, epsilon, self.privacy.delta)
        return arrays, metrics

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        np.random.seed()  # fresh OS entropy: the global generator may hold a known training seed
        return super()._add_noise_to_aggregated_arrays(aggregated_arrays)
