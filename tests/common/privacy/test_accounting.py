"""The RDP accountant as the site uses it: ε of a history, the noise an ε target implies, the true sample rate."""

from __future__ import annotations

import pytest

from fedseg.common.privacy.accounting import epsilon, extended, noise_for, sample_rate
from fedseg.common.privacy.config import PrivacyConfig


def test_sample_rate_is_the_expected_batch_over_the_cases() -> None:
    assert sample_rate(2, 40) == 0.05
    assert sample_rate(4, 3) == 1.0  # a batch larger than the site: every case every step, no amplification
    with pytest.raises(ValueError, match="at least one case"):
        sample_rate(2, 0)


def test_epsilon_grows_with_steps_and_rate_and_falls_with_noise() -> None:
    base = epsilon([(1.0, 0.1, 100)], 1e-5)
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([(1.0, 0.1, 200)], 1e-5) > base
    assert epsilon([(1.0, 0.5, 100)], 1e-5) > base
    assert epsilon([(2.0, 0.1, 100)], 1e-5) < base
    assert epsilon([(1.0, 0.1, 100)], 1e-3) < base  # a larger delta buys a smaller epsilon


def test_a_split_history_composes_to_the_same_epsilon() -> None:
    # what lets the site keep rounds, runs and restarts as one history: 3 x 10 steps is 30 steps
    history = extended(extended(extended([], (1.1, 0.2, 10)), (1.1, 0.2, 10)), (1.1, 0.2, 10))
    assert history == [(1.1, 0.2, 30)]
    mixed = extended(history, (2.0, 0.2, 5))
    assert mixed == [(1.1, 0.2, 30), (2.0, 0.2, 5)]
    assert epsilon(mixed, 1e-5) > epsilon(history, 1e-5)
    assert extended(history, (3.0, 0.2, 0)) == history


def test_the_noise_for_a_target_spends_at_most_the_target() -> None:
    sigma = noise_for(8.0, 1e-5, 0.5, 50)
    assert 7.9 < epsilon([(sigma, 0.5, 50)], 1e-5) <= 8.0
    assert noise_for(1.0, 1e-5, 0.5, 50) > sigma


def test_the_server_names_the_federation_after_its_output_folder() -> None:
    asked = PrivacyConfig(mode="dp-sgd", epsilon=8.0)
    sent = asked.for_run(20, "/runs/fed-1")
    assert sent.rounds == 20 and sent.federation.startswith("run-")
    assert asked.for_run(30, "/runs/fed-1").federation == sent.federation  # --resume, even with more rounds
    assert asked.for_run(20, "/runs/fed-2").federation != sent.federation
    named = PrivacyConfig(mode="dp-sgd", federation="pancreas-study")
    assert named.for_run(20, "/runs/fed-1").federation == "pancreas-study"
