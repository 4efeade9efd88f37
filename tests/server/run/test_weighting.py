"""No site can buy the model: a site that declares 100000 cases from its first reply counts no more than the cap,
in every place a weight is used (the FedAvg/FedProx mean, FedAdam/FedYogi's mean, BatchNorm pooling, the
class-aware head, Flower's multi-krum average); under ``weighting = "cases"`` (the old behaviour) the same liar
moves every one of them. Driven offline through the server's own strategy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedseg.common.fl.offline import train_reply
from fedseg.server.config import ServerConfig, StrategyConfig, Weighting
from fedseg.server.run.bn import pooled_statistics
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from fedseg.server.run.weighting import aggregation_weights, pin_problem, shares
from tests.server.run.test_rogue_replies import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")

Weights = dict[str, np.ndarray]
LIAR_CASES = 100_000
HONEST = {1: 4, 2: 6}  # node -> declared cases; the liar is node 3
GLOBAL: Weights = {
    "conv.weight": np.zeros((2, 3), np.float32),
    "final.weight": np.zeros((3, 2), np.float32),
    "final.bias": np.zeros(3, np.float32),
    "bn.weight": np.ones(3, np.float32),
    "bn.running_mean": np.zeros(3, np.float32),
    "bn.running_var": np.ones(3, np.float32),
    "bn.num_batches_tracked": np.array(4, np.int64),
}
FLAGS = {1: (True, True, False), 2: (True, False, True), 3: (True, True, True)}
GROUPS = {
    "weights": ["conv.weight", "bn.weight"],
    "head": ["final.weight", "final.bias"],
    "batchnorm": ["bn.running_mean", "bn.running_var"],
}


def trained(node: int) -> Weights:
    """Site ``node``'s weights after honest local training; the liar (node 3) adds a secret offset."""
    rng = np.random.default_rng(node)
    out = {
        k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in GLOBAL.items() if v.dtype.kind == "f"
    }
    out["bn.running_var"] = np.abs(out["bn.running_var"]).astype(np.float32)
    out["bn.num_batches_tracked"] = np.array(5, np.int64)
    if node == 3:
        out = {k: (v + 0.05 if v.dtype.kind == "f" else v) for k, v in out.items()}
    return out


def reply(node: int, cases: int) -> Message:
    message = train_reply(node, trained(node), cases, site=f"site-{node}")
    message.content.config_records["site"] = ConfigRecord({"name": f"site-{node}", "annotated": list(FLAGS[node])})
    return message


def aggregate(name: str, weighting: Weighting, liar_cases: int, pins: dict[str, int] | None = None) -> Weights:
    limits = StrategyConfig(name=name, weighting=weighting, num_malicious=0, krum_select=3)  # type: ignore[arg-type]
    strategy = RecordingStrategy(
        build_strategy(ServerConfig(min_sites=3, strategy=limits)), 3, 1, 1.0, limits=limits, pins=pins
    )
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))  # type: ignore[arg-type]
    replies = [reply(1, HONEST[1]), reply(2, HONEST[2]), reply(3, liar_cases)]
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None and not strategy.stats[1].rejected
    return {k: new[k].numpy() for k in new}


def test_weights_are_hand_computed() -> None:
    assert aggregation_weights([4, 6, LIAR_CASES], "cases", 2.0) == [4, 6, LIAR_CASES]
    assert aggregation_weights([4, 6, LIAR_CASES], "equal", 2.0) == [1, 1, 1]
    assert aggregation_weights([4, 6, LIAR_CASES], "capped", 2.0) == [4, 6, 12]  # low median 6
    assert aggregation_weights([4, LIAR_CASES], "capped", 2.0) == [4, 8]  # two sites: the smaller one sets the cap
    assert aggregation_weights([4, 50, LIAR_CASES], "capped", 2.0, [False, True, False]) == [4, 50, 100]
    assert shares([4, 6, 12]) == pytest.approx([4 / 22, 6 / 22, 12 / 22])


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "multi-krum"])
def test_a_liar_at_the_cap_from_its_first_reply_buys_nothing_more(name: str) -> None:
    cap = 2 * HONEST[2]
    capped = aggregate(name, "capped", LIAR_CASES)
    at_cap = aggregate(name, "capped", cap)
    bought = aggregate(name, "cases", LIAR_CASES)
    honest_claim = aggregate(name, "cases", cap)
    levers = ["weights"]
    levers += ["batchnorm"] if name != "multi-krum" else []  # a robust rule pools BatchNorm by the median
    levers += ["head"] if name in ("fedavg", "fedprox") else []  # the class-aware head
    for group in GROUPS:
        for key in GROUPS[group]:
            np.testing.assert_allclose(capped[key], at_cap[key], rtol=0, atol=1e-7, err_msg=f"{name} {key}")
    for group in levers:
        for key in GROUPS[group]:  # the attack fires where weights are the declared cases: the liar moves it
            assert np.abs(bought[key] - honest_claim[key]).max() > 1e-3, f"{name} {key}: the liar had no lever"


def test_the_liars_share_is_recorded_and_bounded() -> None:
    limits = StrategyConfig(max_weight_ratio=2.0)
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=3)), 3, 1, 1.0, limits=limits)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))  # type: ignore[arg-type]
    strategy.aggregate_train(1, [reply(1, 4), reply(2, 6), reply(3, LIAR_CASES)])
    share = {s.site: s.share for s in strategy.stats[1].sites}
    assert share == pytest.approx({"site-1": 4 / 22, "site-2": 6 / 22, "site-3": 12 / 22})
    cases = {s.site: s.cases for s in strategy.stats[1].sites}
    assert cases["site-3"] == LIAR_CASES  # what it claimed stays on record


def test_a_pinned_site_declaring_more_than_its_pin_is_rejected() -> None:
    limits = StrategyConfig()
    strategy = RecordingStrategy(
        build_strategy(ServerConfig(min_sites=3)), 3, 1, 1.0, limits=limits, pins={"site-3": 5, "site-2": 6}
    )
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))  # type: ignore[arg-type]
    strategy.aggregate_train(1, [reply(1, 4), reply(2, 6), reply(3, LIAR_CASES)])
    (rejection,) = strategy.stats[1].rejected
    assert rejection.site == "site-3" and "exceeds the 5 cases pinned for site 'site-3'" in rejection.reason
    assert pin_problem("site-2", 6, {"site-2": 6}) is None


def test_a_pinned_site_counts_its_pin_uncapped() -> None:
    pinned = aggregate("fedavg", "capped", 60, pins={"site-3": 60})
    by_cases = aggregate("fedavg", "cases", 60)
    for key in GROUPS["weights"]:
        np.testing.assert_allclose(pinned[key], by_cases[key], atol=1e-7)


def test_robust_pooling_ignores_one_site_raising_every_variance() -> None:
    honest = [
        {"bn.running_mean": np.zeros(2, np.float32), "bn.running_var": np.full(2, v, np.float32)} for v in (1.0, 1.2)
    ]
    liar = {"bn.running_mean": np.zeros(2, np.float32), "bn.running_var": np.full(2, 1e4, np.float32)}
    ref = dict(honest[0])
    median = pooled_statistics([*honest, liar], [1, 1, 1], ref, "median")
    np.testing.assert_allclose(median["bn.running_var"], [1.2, 1.2])
    mean = pooled_statistics([*honest, liar], [1, 1, 1], ref, "mean")
    assert float(mean["bn.running_var"][0]) > 3000  # what the weighted mean lets it do
    trimmed = pooled_statistics([*honest, liar, honest[0], honest[1]], [1] * 5, ref, "trimmed", trim=0.2)
    np.testing.assert_allclose(trimmed["bn.running_var"], [3.4 / 3] * 2, rtol=1e-6)  # 1.0 and 1e4 cut
