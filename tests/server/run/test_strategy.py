"""Strategy selection and the recording wrapper, driven by hand-made replies (no Flower runtime)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum

from fedseg.common.errors import FedsegError
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.strategy import RecordingStrategy, build_strategy, wait_for_sites
from tests.server.conftest import trained

#: FedAvg's own weighting (declared cases), which the hand computations here follow.
CASE_WEIGHTS = StrategyConfig(weighting="cases")


@pytest.mark.parametrize(
    ("name", "kind"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi)]
)
def test_build_strategy_selects_the_named_flower_strategy(name: str, kind: type) -> None:
    cfg = ServerConfig(min_sites=3, fraction=0.5, strategy=StrategyConfig(name=name))  # type: ignore[arg-type]
    strategy = build_strategy(cfg)
    assert type(strategy) is kind
    assert strategy.min_train_nodes == 3
    assert strategy.min_available_nodes == 3
    assert strategy.fraction_train == 0.5
    assert strategy.fraction_evaluate == 0.0
    assert strategy.weighted_by_key == "num-examples"


@pytest.mark.parametrize(
    ("name", "kind", "sites"),
    [
        ("median", FedMedian, 3),
        ("trimmed-mean", FedTrimmedAvg, 3),
        ("krum", Krum, 5),
        ("multi-krum", MultiKrum, 5),
        ("bulyan", Bulyan, 7),
    ],
)
def test_build_strategy_selects_the_robust_flower_strategies(name: str, kind: type, sites: int) -> None:
    s = StrategyConfig(name=name, trim_beta=0.25, num_malicious=1, krum_select=3)  # type: ignore[arg-type]
    strategy = build_strategy(ServerConfig(min_sites=sites, strategy=s))
    assert type(strategy) is kind and strategy.min_train_nodes == sites
    if isinstance(strategy, FedTrimmedAvg):
        assert strategy.beta == 0.25
    if isinstance(strategy, MultiKrum):
        assert strategy.num_malicious_nodes == 1
        assert strategy.num_nodes_to_select == (1 if name == "krum" else 3)


def test_byzantine_rules_refuse_too_few_sites() -> None:
    with pytest.raises(ValueError, match=r"bulyan needs min_sites >= 4 x num_malicious \+ 3 = 7"):
        ServerConfig(min_sites=6, strategy=StrategyConfig(name="bulyan"))
    assert ServerConfig(min_sites=7, strategy=StrategyConfig(name="bulyan")).min_sites == 7


def test_fedprox_and_fedadam_get_their_parameters() -> None:
    prox = build_strategy(ServerConfig(strategy=StrategyConfig(name="fedprox", proximal_mu=0.25)))
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.25
    adam = build_strategy(ServerConfig(strategy=StrategyConfig(name="fedadam", server_lr=0.05, tau=1e-4)))
    assert isinstance(adam, FedAdam) and adam.eta == 0.05 and adam.tau == 1e-4


class FakeGrid:
    """The part of Flower's Grid that strategies use for sampling."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return self.nodes


Reply = Callable[..., Message]

pytestmark = pytest.mark.usefixtures("task_identity")


def _recorder(min_replies: int = 1) -> RecordingStrategy:
    return RecordingStrategy(
        build_strategy(ServerConfig(min_sites=2)), 2, min_replies, site_wait_timeout=1.0, limits=CASE_WEIGHTS
    )


def _configure(strategy: RecordingStrategy, weights: dict[str, np.ndarray], nodes: int = 2) -> None:
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(range(1, nodes + 1))))  # type: ignore[arg-type]
    assert len(messages) == nodes


def test_aggregate_is_sample_weighted_and_records_each_site(weights: dict[str, np.ndarray], reply: Reply) -> None:
    strategy = _recorder()
    _configure(strategy, weights)
    replies = [
        reply(1, {"w": np.full((2, 2), 1.0, np.float32), "n": np.array(5)}, cases=1, loss=0.9, site="a"),
        reply(2, {"w": np.full((2, 2), 4.0, np.float32), "n": np.array(5)}, cases=3, loss=0.3, site="b"),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), (1.0 * 1 + 4.0 * 3) / 4))
    assert metrics["train-loss"] == pytest.approx((0.9 * 1 + 0.3 * 3) / 4)
    stats = strategy.stats[1]
    assert [(s.site, s.cases, s.loss) for s in stats.sites] == [("a", 1, 0.9), ("b", 3, 0.3)]
    assert stats.sampled == 2 and stats.failures == 0
    assert stats.bytes_in == sum(s.bytes_in for s in stats.sites) > 2 * 16
    assert stats.bytes_out == 2 * ArrayRecord({k: Array(v) for k, v in weights.items()}).count_bytes()


def test_errors_and_malformed_replies_are_dropped_not_fatal(
    weights: dict[str, np.ndarray], reply: Reply, failed_reply: Reply
) -> None:
    strategy = _recorder()
    _configure(strategy, weights, nodes=4)
    good = reply(1, {"w": np.ones((2, 2), np.float32), "n": np.array(1)}, cases=2, site="a")
    wrong_keys = reply(2, {"other": np.ones(2, np.float32)}, cases=2, site="b")
    no_metrics = reply(3, trained(weights), cases=2, metrics={"num-examples": 2}, site="c")
    arrays, _ = strategy.aggregate_train(1, [good, wrong_keys, no_metrics, failed_reply(4)])
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.ones((2, 2)))
    assert [s.site for s in strategy.stats[1].sites] == ["a"]
    assert strategy.stats[1].failures == 3


def test_late_replies_count_as_failures_and_unnamed_sites_use_the_node_id(
    weights: dict[str, np.ndarray], reply: Reply
) -> None:
    strategy = _recorder()
    _configure(strategy, weights, nodes=3)
    strategy.aggregate_train(1, [reply(7, trained(weights), cases=1)])
    assert strategy.stats[1].failures == 2
    assert strategy.stats[1].sites[0].site == "node-7"


def test_too_few_replies_keep_the_previous_model(
    weights: dict[str, np.ndarray], reply: Reply, failed_reply: Reply
) -> None:
    strategy = _recorder(min_replies=2)
    _configure(strategy, weights)
    arrays, metrics = strategy.aggregate_train(1, [reply(1, trained(weights), cases=1, site="a"), failed_reply(2)])
    assert arrays is None and metrics is None
    assert len(strategy.stats[1].sites) == 1


def test_on_round_callback_sees_the_stats(weights: dict[str, np.ndarray], reply: Reply) -> None:
    seen = []
    strategy = RecordingStrategy(build_strategy(ServerConfig()), 2, 1, 1.0, on_round=lambda r, s: seen.append((r, s)))
    _configure(strategy, weights)
    strategy.aggregate_train(1, [reply(1, trained(weights), cases=1, site="a")])
    assert seen[0][0] == 1 and seen[0][1].sites[0].site == "a"


def test_wait_for_sites_returns_when_enough_and_times_out_otherwise() -> None:
    assert wait_for_sites(FakeGrid([1, 2, 3]), 2, timeout=1.0) == 3  # type: ignore[arg-type]
    with pytest.raises(FedsegError, match="only 1 of the 2 required sites were connected after 0 s"):
        wait_for_sites(FakeGrid([1]), 2, timeout=0.2, poll=0.05)  # type: ignore[arg-type]


def test_configure_train_gives_up_when_sites_do_not_come(weights: dict[str, np.ndarray]) -> None:
    strategy = RecordingStrategy(build_strategy(ServerConfig()), 2, 1, site_wait_timeout=0.1)
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    with pytest.raises(FedsegError, match="start more sites"):
        strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1]))  # type: ignore[arg-type]


def test_a_reply_trained_under_a_site_policy_is_used_and_logged(
    weights: dict[str, np.ndarray], reply: Reply, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = _recorder()
    _configure(strategy, weights)
    clamped = reply(1, trained(weights), cases=2, site="a")
    clamped.content.config_records["site"]["policy"] = "steps 250 -> 100 (max_steps)"
    strategy.aggregate_train(1, [clamped, reply(2, trained(weights), cases=2, site="b")])
    assert [s.site for s in strategy.stats[1].sites] == ["a", "b"]
    logged = [r.getMessage() for r in caplog.records if "site policy" in r.getMessage()]
    assert logged == ["round 1: a trained under its site policy: steps 250 -> 100 (max_steps)"]
