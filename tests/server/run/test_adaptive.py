"""FedAdam/FedYogi through our wrapper: values against a hand computation, BN statistics kept out of the
server optimiser (variances stay positive), the model's dtype kept; BN pooling by the law of total variance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedseg.common.fl.offline import train_reply
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.bn import pooled_statistics
from fedseg.server.run.strategy import RecordingStrategy, build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")


class OneNodeGrid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _reply(node: int, weights: dict[str, np.ndarray], cases: int) -> Message:
    return train_reply(node, weights, cases, site=f"site-{node}")


def _strategy(name: str, round_offset: int = 0) -> RecordingStrategy:
    s = StrategyConfig(name=name, weighting="cases", server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)  # type: ignore[arg-type]
    cfg = ServerConfig(min_sites=2, strategy=s)
    return RecordingStrategy(build_strategy(cfg), 2, 1, 1.0, limits=cfg.strategy, round_offset=round_offset)


def _round(strategy: RecordingStrategy, rnd: int, glob: dict[str, np.ndarray], sites: list[np.ndarray]) -> np.ndarray:
    arrays = ArrayRecord({"p": Array(glob["p"])})
    list(strategy.configure_train(rnd, arrays, ConfigRecord(), OneNodeGrid()))  # type: ignore[arg-type]
    out, _ = strategy.aggregate_train(rnd, [_reply(1, {"p": sites[0]}, 1), _reply(2, {"p": sites[1]}, 3)])
    assert out is not None
    value = out["p"].numpy()
    assert value.dtype == np.float32
    return value


# Two parameters; sites 1 (1 case) and 2 (3 cases). Round 1 global (1, 2); FedAvg of the sites (1.5, 1.0):
# Δ1 = (0.5, -1.0). Round 2 from the new global x1, both sites send x1 + (0.2, 0.2): Δ2 = (0.2, 0.2).
W0 = np.array([1.0, 2.0], np.float32)
R1 = [np.array([1.2, 1.6], np.float32), np.array([1.6, 0.8], np.float32)]  # (1.2 + 3 * 1.6) / 4 = 1.5, ...


def test_fedadam_matches_the_hand_computation() -> None:
    strategy = _strategy("fedadam")
    x1 = _round(strategy, 1, {"p": W0}, R1)
    d1 = np.array([0.5, -1.0])
    m1 = 0.1 * d1  # β1 m0 + (1 − β1) Δ
    v1 = 0.01 * d1**2  # β2 v0 + (1 − β2) Δ²
    eta1 = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # Flower's bias correction uses round t + 1 = 2
    expected1 = W0 + eta1 * m1 / (np.sqrt(v1) + 1e-3)
    np.testing.assert_allclose(x1, expected1, rtol=1e-6)
    assert expected1 == pytest.approx([1.0727902, 1.9264891], abs=1e-6)
    x2 = _round(strategy, 2, {"p": x1}, [x1 + 0.2, x1 + 0.2])
    d2 = np.array([0.2, 0.2])
    m2 = 0.9 * m1 + 0.1 * d2
    v2 = 0.99 * v1 + 0.01 * d2**2
    eta2 = 0.1 * math.sqrt(1 - 0.99**3) / (1 - 0.9**3)
    np.testing.assert_allclose(x2, x1 + eta2 * m2 / (np.sqrt(v2) + 1e-3), rtol=1e-6)


def test_fedyogi_matches_the_hand_computation() -> None:
    strategy = _strategy("fedyogi")
    x1 = _round(strategy, 1, {"p": W0}, R1)
    d1 = np.array([0.5, -1.0])
    m1 = 0.1 * d1
    v1 = 0.0 - 0.01 * d1**2 * np.sign(0.0 - d1**2)  # v − (1 − β2) Δ² sign(v − Δ²)  = 0.01 Δ²
    np.testing.assert_allclose(x1, W0 + 0.1 * m1 / (np.sqrt(v1) + 1e-3), rtol=1e-6)
    x2 = _round(strategy, 2, {"p": x1}, [x1 + 0.2, x1 + 0.2])
    d2 = np.array([0.2, 0.2])
    m2 = 0.9 * m1 + 0.1 * d2
    v2 = v1 - 0.01 * d2**2 * np.sign(v1 - d2**2)  # (0.0025, 0.01) vs Δ² 0.04: both grow by 0.0004
    assert v2 == pytest.approx([0.0029, 0.0104])
    np.testing.assert_allclose(x2, x1 + 0.1 * m2 / (np.sqrt(v2) + 1e-3), rtol=1e-6)


def test_fedadam_continues_its_bias_correction_after_a_resume() -> None:
    straight = _strategy("fedadam")
    x1 = _round(straight, 1, {"p": W0}, R1)
    saved = straight.state(1)
    x2 = _round(straight, 2, {"p": x1}, [x1 + 0.2, x1 + 0.2])
    resumed = _strategy("fedadam", round_offset=1)  # a new ServerApp: Flower counts from round 1 again
    resumed.restore(saved)
    np.testing.assert_array_equal(_round(resumed, 1, {"p": x1}, [x1 + 0.2, x1 + 0.2]), x2)
    fresh = _strategy("fedadam", round_offset=1)  # without the moments the step differs
    assert not np.array_equal(_round(fresh, 1, {"p": x1}, [x1 + 0.2, x1 + 0.2]), x2)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_running_var_stays_positive_over_30_rounds(name: str) -> None:
    """The probe of the issue: global running_var 2e-3, both sites report 1e-4 every round."""
    strategy = _strategy(name)
    glob = {
        "w": np.array([0.5, -0.5], np.float32),
        "bn.running_mean": np.zeros(2, np.float32),
        "bn.running_var": np.full(2, 2e-3, np.float32),
        "bn.num_batches_tracked": np.array(0, np.int64),
    }
    for rnd in range(1, 31):
        arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
        list(strategy.configure_train(rnd, arrays, ConfigRecord(), OneNodeGrid()))  # type: ignore[arg-type]
        sites = []
        for node in (1, 2):
            site = dict(glob)
            site["w"] = (glob["w"] + 0.01 * node).astype(np.float32)
            site["bn.running_mean"] = np.full(2, 0.01 * node, np.float32)
            site["bn.running_var"] = np.full(2, 1e-4, np.float32)
            site["bn.num_batches_tracked"] = np.array(rnd * 5, np.int64)
            sites.append(_reply(node, site, node))
        out, _ = strategy.aggregate_train(rnd, sites)
        assert out is not None
        glob = {k: out[k].numpy() for k in glob}
        assert all(v.dtype == arrays[k].numpy().dtype for k, v in glob.items())
        assert (glob["bn.running_var"] > 0).all(), f"round {rnd}: {glob['bn.running_var']}"
    # pooled: weights 1/3, 2/3; mean 0.01 * 5/3; var 1e-4 + Σ w (μ_i − μ)² = 1e-4 + 2/9 * 1e-4
    np.testing.assert_allclose(glob["bn.running_var"], 1e-4 * (1 + 2 / 9), rtol=1e-5)
    np.testing.assert_allclose(glob["bn.running_mean"], 0.05 / 3, rtol=1e-5)
    assert int(glob["bn.num_batches_tracked"]) == 150


def test_pooled_statistics_follow_the_law_of_total_variance() -> None:
    # Two sites with equal weight: N(0, 1) and N(2, 1) pooled = mean 1, variance 1 + 1 = 2 (not a plain mean of 1).
    ref = {"bn.running_mean": np.zeros(1, np.float32), "bn.running_var": np.ones(1, np.float32)}
    a = {"bn.running_mean": np.array([0.0], np.float32), "bn.running_var": np.array([1.0], np.float32)}
    b = {"bn.running_mean": np.array([2.0], np.float32), "bn.running_var": np.array([1.0], np.float32)}
    pooled = pooled_statistics([a, b], [5, 5], ref)
    assert pooled["bn.running_mean"].tolist() == [1.0] and pooled["bn.running_var"].tolist() == [2.0]
    assert pooled["bn.running_var"].dtype == np.float32
