"""Client-level DP through Flower's server-side fixed-clipping wrapper: clipping, noise that a known seed cannot
predict, the run's accountant (ε target, resume) and the combinations it refuses."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from pydantic import ValidationError

from fedseg.common.fl.offline import train_reply
from fedseg.common.privacy.config import PrivacyConfig
from fedseg.server.config import ServerConfig
from fedseg.server.run.clientdp import ClientLevelDP, epsilon_after, noise_for
from fedseg.server.run.offline import OfflineAggregator, SiteReply
from fedseg.server.run.state import load_state, save_state
from fedseg.server.run.strategy import RecordingStrategy, build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")

SIZE = 20_000
GLOBAL = {"conv.weight": np.zeros(SIZE, np.float32), "norm.weight": np.ones(4, np.float32)}


def _config(noise: float = 1.0, clip: float = 1.0, **privacy: object) -> ServerConfig:
    return ServerConfig.model_validate(
        {
            "min_sites": 3,
            "min_replies": 3,
            "rounds": 4,
            "model": {"norm": "group"},
            "strategy": {"weighting": "equal", "screen": "off"},
            "privacy": {"mode": "client-dp", "noise_multiplier": noise, "update_clip_norm": clip, **privacy},
        }
    )


def _replies(scale: float = 1.0) -> list[SiteReply]:
    """Three sites; the third's update is ``scale`` x its honest one."""
    rng = np.random.default_rng(7)
    out = []
    for i, factor in enumerate((1.0, 1.0, scale), start=1):
        update = 0.01 * rng.standard_normal(SIZE).astype(np.float32) * factor
        out.append(SiteReply(f"site-{i}", {"conv.weight": update, "norm.weight": GLOBAL["norm.weight"]}, 4))
    return out


def _clipped(update: np.ndarray, clip: float) -> np.ndarray:
    return update * min(1.0, clip / float(np.linalg.norm(update)))


def test_every_update_is_clipped_before_the_mean() -> None:
    replies = _replies(scale=100.0)  # a x100 site
    merged, stats = OfflineAggregator(_config(noise=1e-9, clip=0.5))(GLOBAL, replies)
    expected = np.mean([_clipped(r.weights["conv.weight"], 0.5) for r in replies], axis=0)
    np.testing.assert_allclose(merged["conv.weight"], expected, atol=1e-6)
    assert float(np.linalg.norm(replies[2].weights["conv.weight"])) > 50 * 0.5  # the attack was far above the clip
    assert [s.share for s in stats.sites] == pytest.approx([1 / 3] * 3)


def test_the_noise_has_the_calibrated_spread_and_a_known_seed_does_not_predict_it() -> None:
    replies = _replies()
    clean = np.mean([_clipped(r.weights["conv.weight"], 1.0) for r in replies], axis=0)
    noises = []
    for _ in range(2):
        np.random.seed(0)  # what a seeded training step in the server process leaves behind
        merged, _ = OfflineAggregator(_config(noise=1.0, clip=1.0))(GLOBAL, replies)
        noises.append(merged["conv.weight"] - clean)
    assert np.std(noises[0]) == pytest.approx(1.0 * 1.0 / 3, rel=0.05)  # noise_multiplier x clip / sites
    assert not np.allclose(noises[0], noises[1])
    # the attack: Flower's wrapper alone draws from the global generator, so the same seed gives the same noise
    plain = []
    for _ in range(2):
        recording = RecordingStrategy(build_strategy(ServerConfig()), 1, 3, 1.0, limits=_config().strategy)
        wrapper = DifferentialPrivacyServerSideFixedClipping(recording, 1.0, 1.0, 3)
        arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
        recording.begin_round(arrays)
        wrapper.current_arrays = arrays
        np.random.seed(0)
        new, _ = wrapper.aggregate_train(
            1, [train_reply(n, r.weights, 4, site=r.site) for n, r in enumerate(replies, 1)]
        )
        assert new is not None
        plain.append(new["conv.weight"].numpy() - clean)
    np.testing.assert_array_equal(plain[0], plain[1])


def test_epsilon_is_counted_per_release_and_recorded_per_site() -> None:
    cfg = _config(noise=2.0)
    aggregate = OfflineAggregator(cfg)
    for _ in range(2):
        _, stats = aggregate(GLOBAL, _replies())
    expected = epsilon_after(2.0, 2, cfg.privacy, 3)
    assert [s.epsilon for s in stats.sites] == pytest.approx([expected] * 3)
    assert {s.delta for s in stats.sites} == {1e-5}
    assert expected > epsilon_after(2.0, 1, cfg.privacy, 3) > 0


def test_an_epsilon_target_sets_the_smallest_noise_that_keeps_it() -> None:
    privacy = PrivacyConfig(mode="client-dp", epsilon=8.0)
    noise = noise_for(8.0, 10, privacy, 3)
    assert epsilon_after(noise, 10, privacy, 3) <= 8.0 < epsilon_after(noise * 0.99, 10, privacy, 3)
    driver = OfflineAggregator(_config(epsilon=8.0)).strategy
    assert isinstance(driver, ClientLevelDP)
    assert driver.noise_multiplier == pytest.approx(noise_for(8.0, 4, privacy, 3))  # the run's 4 rounds


def test_a_resumed_run_keeps_counting(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    cfg = _config(noise=2.0)
    first = OfflineAggregator(cfg)
    first(GLOBAL, _replies())
    save_state(folder, first.recording.state(1))
    resumed = RecordingStrategy(build_strategy(cfg), 1, 3, 1.0, limits=cfg.strategy)
    resumed.restore(load_state(folder, 1))
    driver = ClientLevelDP(resumed, cfg.privacy, 3, cfg.rounds)
    assert driver.epsilon == pytest.approx(epsilon_after(2.0, 1, cfg.privacy, 3))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategy": {"name": "median", "weighting": "equal"}}, "needs strategy.name = fedavg or fedprox, not median"),
        ({"strategy": {"name": "fedadam", "weighting": "equal"}}, "not fedadam"),
        ({"strategy": {"weighting": "capped"}}, "needs strategy.weighting = 'equal'"),
        ({"model": {"norm": "batch"}}, "cannot pool BatchNorm statistics"),
        ({"transport": "fp16"}, "needs transport = 'fp32'"),
        ({"min_replies": 2}, "needs min_replies = min_sites (3)"),
    ],
)
def test_combinations_client_dp_cannot_keep_are_one_line_errors(change: dict[str, object], message: str) -> None:
    raw = _config().model_dump(mode="json")
    raw.update(change)
    with pytest.raises(ValidationError) as err:
        ServerConfig.model_validate(raw)
    (error,) = err.value.errors()
    assert message in error["msg"] and "\n" not in error["msg"]


def test_the_direction_check_is_off_under_dp_sgd_only() -> None:
    from fedseg.server.run.loop import screening_limits

    dp = ServerConfig.model_validate({"model": {"norm": "group"}, "privacy": {"mode": "dp-sgd"}})
    assert dp.strategy.min_update_cosine == 0.0  # the default asks for the check
    assert screening_limits(dp).min_update_cosine == -1.0
    assert screening_limits(ServerConfig()).min_update_cosine == 0.0
    aggregate = OfflineAggregator(dp)
    assert aggregate.recording.limits.min_update_cosine == -1.0
