"""One rogue site among three honest ones: every kind of bad reply is dropped with its reason, never aborting the
round, and the aggregate equals FedAvg of the honest replies alone (driven offline, no Flower runtime)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedseg.common.fl.offline import from_site, train_reply
from fedseg.common.fl.packing import PACKED_KEY, pack_arrays
from fedseg.common.fl.protocol import failure_content
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.strategy import RecordingStrategy, build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")

Weights = dict[str, np.ndarray]
GLOBAL: Weights = {
    "conv.weight": np.ones((2, 3), np.float32),
    "bn.running_mean": np.zeros(3, np.float32),
    "bn.running_var": np.ones(3, np.float32),
    "bn.num_batches_tracked": np.array(4, np.int64),
}
HONEST_CASES = {1: 2, 2: 3, 3: 5}


class FakeGrid:
    """The part of Flower's Grid that strategies use for sampling."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return self.nodes


def honest(node: int) -> Weights:
    """Site ``node``'s honest weights: a small, node-specific step away from the global model."""
    rng = np.random.default_rng(node)
    return {
        "conv.weight": (GLOBAL["conv.weight"] + 0.1 * rng.standard_normal((2, 3))).astype(np.float32),
        "bn.running_mean": (0.1 * node * np.ones(3)).astype(np.float32),
        "bn.running_var": (0.5 + 0.1 * node * np.ones(3)).astype(np.float32),
        "bn.num_batches_tracked": np.array(4 + node, np.int64),
    }


def message(node: int, weights: Weights, metrics: dict[str, object] | None = None, site: str | None = None) -> Message:
    cases = HONEST_CASES.get(node, 2)
    values = {"num-examples": cases, "train-loss": 0.5, "train-samples": 4 * cases, "train-seconds": 1.0}
    return train_reply(node, weights, cases, site=site or f"site-{node}", metrics={**values, **(metrics or {})})  # type: ignore[dict-item]


def run_round(replies_round2: list[Message], nodes: int = 4) -> tuple[RecordingStrategy, ArrayRecord | None]:
    """Round 1: the three honest sites only (pins names and cases); round 2: ``replies_round2``."""
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=3)), 3, 1, 1.0)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    for rnd, replies in ((1, [message(n, honest(n)) for n in (1, 2, 3)]), (2, replies_round2)):
        list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(range(1, nodes + 1))))  # type: ignore[arg-type]
        aggregate, _ = strategy.aggregate_train(rnd, replies)
    return strategy, aggregate


def hand_fedavg() -> Weights:
    """FedAvg of the honest replies by hand: weighted mean, pooled BN statistics, largest step count."""
    w = np.array([HONEST_CASES[n] for n in (1, 2, 3)], np.float64)
    w /= w.sum()
    sites = [honest(n) for n in (1, 2, 3)]
    mean = sum(wi * s["bn.running_mean"].astype(np.float64) for wi, s in zip(w, sites, strict=True))
    var = sum(wi * (s["bn.running_var"] + (s["bn.running_mean"] - mean) ** 2) for wi, s in zip(w, sites, strict=True))
    return {
        "conv.weight": sum(wi * s["conv.weight"].astype(np.float64) for wi, s in zip(w, sites, strict=True)),
        "bn.running_mean": mean,
        "bn.running_var": var,
        "bn.num_batches_tracked": np.array(7),
    }


def _scaled(factor: float) -> Weights:
    return {k: (v * factor).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in honest(4).items()}


def _poke(key: str, value: float) -> Weights:
    w = honest(4)
    w[key] = w[key].copy()
    w[key].reshape(-1)[0] = value
    return w


def _reshaped() -> Weights:
    w = honest(4)
    w["conv.weight"] = np.ones((3, 2), np.float32)
    return w


def _float64() -> Weights:
    return {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in honest(4).items()}


def packed(reply: Message, cut: int = 0) -> Message:
    """``reply`` with its weights packed into one array (``cut``: that many bytes short)."""
    buffer = pack_arrays(reply.content.array_records["arrays"])[PACKED_KEY].numpy()
    reply.content["arrays"] = ArrayRecord({PACKED_KEY: Array(buffer[: buffer.size - cut].copy())})
    return reply


def _garbled(reply: Message) -> Message:
    """``reply`` whose packed array's bytes are no .npy payload."""
    garbage = Array(dtype="uint8", shape=(88,), stype="numpy.ndarray", data=b"\x00" * 88)
    reply.content["arrays"] = ArrayRecord({PACKED_KEY: garbage})
    return reply


def _reordered() -> Weights:
    w = honest(4)
    return {k: w[k] for k in ("bn.running_mean", "conv.weight", "bn.running_var", "bn.num_batches_tracked")}


Case = tuple[Callable[[], Message], bool, str]
CASES: dict[str, Case] = {
    "nan-element": (lambda: message(4, _poke("conv.weight", np.nan)), False, "non-finite"),
    "inf-element": (lambda: message(4, _poke("bn.running_mean", np.inf)), False, "non-finite"),
    "x100-weights": (lambda: message(4, _scaled(100.0)), False, "x the round's median"),
    "wrong-shape-first": (lambda: message(4, _reshaped()), True, "has shape (3, 2), the global model (2, 3)"),
    "wrong-shape-second": (lambda: message(4, _reshaped()), False, "has shape (3, 2)"),
    "float64-arrays": (lambda: message(4, _float64()), False, "has dtype float64, the global model float32"),
    "negative-variance": (lambda: message(4, _poke("bn.running_var", -1e-3)), False, "negative variances"),
    "num-examples-0": (lambda: message(4, honest(4), {"num-examples": 0}), False, "must be positive"),
    "num-examples-nan": (lambda: message(4, honest(4), {"num-examples": float("nan")}), False, "integer"),
    "num-examples-inf": (lambda: message(4, honest(4), {"num-examples": float("inf")}), False, "integer"),
    "num-examples-1e9": (lambda: message(4, honest(4), {"num-examples": 10**9}), False, "exceeds max_examples"),
    "num-examples-1e9-float": (lambda: message(4, honest(4), {"num-examples": 1e9}), False, "integer"),
    "num-examples-2.5": (lambda: message(4, honest(4), {"num-examples": 2.5}), False, "integer, got 2.5"),
    "extra-metric": (lambda: message(4, honest(4), {"dice": 0.9}), False, "extra ['dice']"),
    "list-metric": (lambda: message(4, honest(4), {"train-loss": [0.1, 0.2]}), False, "train-loss must be a finite"),
    "nan-loss": (lambda: message(4, honest(4), {"train-loss": float("nan")}), False, "train-loss must be a finite"),
    "other-site-name": (lambda: message(4, honest(4), site="site-1"), False, "'site-1' belongs to node 1"),
    # packed replies: digest + 6 + 3 + 3 float32 + one int64 = 32 + 56 = 88 bytes
    "packed-nan-element": (lambda: packed(message(4, _poke("conv.weight", np.nan))), False, "non-finite"),
    "packed-x100-weights": (lambda: packed(message(4, _scaled(100.0))), False, "x the round's median"),
    "packed-short": (lambda: packed(message(4, honest(4)), cut=4), True, "are 84 bytes, the model needs 88"),
    "packed-reordered": (lambda: packed(message(4, _reordered())), False, "laid out for another model"),
    "packed-not-npy": (lambda: _garbled(packed(message(4, honest(4)))), False, "packed weights cannot be decoded"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_rogue_reply_is_dropped_and_the_honest_aggregate_stands(case: str, caplog: pytest.LogCaptureFixture) -> None:
    make, first, reason = CASES[case]
    replies = [message(n, honest(n)) for n in (1, 2, 3)]
    replies.insert(0 if first else 1, make())
    strategy, aggregate = run_round(replies)
    assert aggregate is not None
    expected = hand_fedavg()
    for key, value in expected.items():
        got = aggregate[key].numpy()
        assert got.dtype == GLOBAL[key].dtype and got.shape == GLOBAL[key].shape
        np.testing.assert_allclose(got, value, rtol=0, atol=1e-6, err_msg=key)
    _, alone = run_round([message(n, honest(n)) for n in (1, 2, 3)])
    assert alone is not None
    for key in GLOBAL:
        np.testing.assert_array_equal(aggregate[key].numpy(), alone[key].numpy())
    stats = strategy.stats[2]
    assert [s.site for s in stats.sites] == ["site-1", "site-2", "site-3"]
    assert len(stats.rejected) == 1
    assert stats.rejected[0].site in ("site-4", "site-1")
    assert reason in stats.rejected[0].reason
    assert stats.failures == 1
    assert all(s.update_norm is not None and 0 < s.update_norm < 1 for s in stats.sites)
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "rejected the reply" in r.message]
    assert len(logged) == 1 and reason in logged[0]


def test_packed_honest_replies_aggregate_exactly_like_per_tensor_ones() -> None:
    _, mixed = run_round([packed(message(1, honest(1))), message(2, honest(2)), packed(message(3, honest(3)))])
    _, alone = run_round([message(n, honest(n)) for n in (1, 2, 3)])
    assert mixed is not None and alone is not None
    for key in GLOBAL:
        np.testing.assert_array_equal(mixed[key].numpy(), alone[key].numpy())


def test_a_node_cannot_change_its_name_or_exceed_its_declared_cases() -> None:
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=3)), 3, 1, 1.0)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    rounds = [
        [message(n, honest(n)) for n in (1, 2, 3)],
        [message(1, honest(1), site="site-9"), message(2, honest(2), {"num-examples": 4}), message(3, honest(3))],
    ]
    for rnd, replies in enumerate(rounds, start=1):
        list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))  # type: ignore[arg-type]
        strategy.aggregate_train(rnd, replies)
    reasons = {r.site: r.reason for r in strategy.stats[2].rejected}
    assert reasons == {
        "site-9": "node 1 joined as site 'site-1' and now claims to be 'site-9'",
        "site-2": "num-examples 4 exceeds the 3 cases this site declared first",
    }


def test_a_site_failure_reply_and_an_absolute_norm_bound_are_recorded() -> None:
    limits = StrategyConfig(max_update_norm=1.5)
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=2)), 2, 1, 1.0, limits=limits)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))  # type: ignore[arg-type]
    failed = from_site(failure_content("site-3", "12 of 20 local steps had a non-finite loss"), 3)
    far = honest(2)
    far["conv.weight"] = far["conv.weight"] + 1.0
    aggregate, _ = strategy.aggregate_train(1, [message(1, honest(1)), message(2, far), failed])
    assert aggregate is not None
    np.testing.assert_allclose(aggregate["conv.weight"].numpy(), honest(1)["conv.weight"], atol=1e-6)
    reasons = {r.site: r.reason for r in strategy.stats[1].rejected}
    assert reasons["site-3"] == "site failure: 12 of 20 local steps had a non-finite loss"
    assert reasons["site-2"].startswith("update norm") and "max_update_norm 1.5" in reasons["site-2"]


def test_clipping_scales_each_update_to_the_norm() -> None:
    limits = StrategyConfig(clip_norm=0.05, max_update_ratio=0)
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=1)), 1, 1, 1.0, limits=limits)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1])))  # type: ignore[arg-type]
    aggregate, _ = strategy.aggregate_train(1, [message(1, honest(1))])
    assert aggregate is not None
    delta = honest(1)["conv.weight"] - GLOBAL["conv.weight"]
    got = aggregate["conv.weight"].numpy() - GLOBAL["conv.weight"]
    np.testing.assert_allclose(got, delta * 0.05 / np.linalg.norm(delta), atol=1e-6)


def test_a_restarted_site_keeps_its_name_and_its_declared_cases_on_a_new_node() -> None:
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=3)), 3, 1, 1.0)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    rounds = [
        [message(n, honest(n)) for n in (1, 2, 3)],
        [message(1, honest(1)), message(2, honest(2)), message(7, honest(3), site="site-3")],  # site-3 rejoined
        [message(1, honest(1)), message(2, honest(2)), message(8, honest(3), {"num-examples": 6}, site="site-3")],
    ]
    for rnd, replies in enumerate(rounds, start=1):
        list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid([1, 2, 7, 8])))  # type: ignore[arg-type]
        strategy.aggregate_train(rnd, replies)
    assert [s.site for s in strategy.stats[2].sites] == ["site-1", "site-2", "site-3"]
    assert strategy.registry.names == {1: "site-1", 2: "site-2", 7: "site-3"}
    assert [r.reason for r in strategy.stats[3].rejected] == [
        "num-examples 6 exceeds the 5 cases this site declared first"
    ]


def test_a_non_finite_aggregate_keeps_the_previous_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # a server optimiser's step can overflow (FedAvg's mean of validated replies cannot)
    strategy = RecordingStrategy(
        build_strategy(ServerConfig(min_sites=1, strategy=StrategyConfig(name="fedadam"))), 1, 1, 1.0
    )
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1])))  # type: ignore[arg-type]
    overflow = ArrayRecord({"conv.weight": Array(np.full((2, 3), np.inf, np.float32))})
    monkeypatch.setattr(strategy.inner, "aggregate_train", lambda rnd, replies: (overflow, None))
    assert strategy.aggregate_train(1, [message(1, honest(1))]) == (None, None)
