"""Class-aware head averaging: two fake sites by hand, through the pure function and through the strategy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedseg.common.fl.protocol import LocalResult, annotated_of, reply_content
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.headavg import SiteHead, class_aware_head, head_keys
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from tests.server.run.test_strategy import FakeGrid

#: FedAvg's own weighting (declared cases), which the hand computations here follow.
CASE_WEIGHTS = StrategyConfig(weighting="cases")

# Four classes. Site A (1 case) annotates background + class 1; site B (3 cases) background + class 2;
# nobody annotates class 3.
A_FLAGS, B_FLAGS = (True, True, False, False), (True, False, True, False)


def _weights(value: float) -> dict[str, np.ndarray]:
    return {
        "final.weight": np.full((4, 2, 1, 1, 1), value, np.float32),
        "final.bias": np.full(4, value, np.float32),
        "dsv2.dsv.0.bias": np.full(4, value, np.float32),
        "conv1.weight": np.full((3,), value, np.float32),
    }


def test_head_keys_are_the_class_rows_only() -> None:
    assert head_keys(set(_weights(0.0))) == ["dsv2.dsv.0.bias", "final.bias", "final.weight"]


def test_class_aware_head_by_hand() -> None:
    a, b, previous = _weights(1.0), _weights(5.0), _weights(-1.0)
    fedavg = {k: (1 * a[k] + 3 * b[k]) / 4 for k in a}  # 4.0 everywhere
    out = class_aware_head(fedavg, previous, [SiteHead(a, 1, A_FLAGS), SiteHead(b, 3, B_FLAGS)])
    # background: (1*1 + 3*5) / 4 = 4; class 1: A only = 1; class 2: B only = 5; class 3: previous = -1
    expected_rows = np.array([4.0, 1.0, 5.0, -1.0], np.float32)
    np.testing.assert_array_equal(out["final.bias"], expected_rows)
    np.testing.assert_array_equal(out["dsv2.dsv.0.bias"], expected_rows)
    np.testing.assert_array_equal(out["final.weight"][:, 0, 0, 0, 0], expected_rows)
    np.testing.assert_array_equal(out["final.weight"][:, 1, 0, 0, 0], expected_rows)
    assert out["conv1.weight"] is fedavg["conv1.weight"]  # the body stays FedAvg


def test_class_aware_head_rejects_mismatched_flags_and_no_sites() -> None:
    w = _weights(0.0)
    with pytest.raises(ValueError, match="4 class rows but a site declares 3"):
        class_aware_head(w, w, [SiteHead(w, 1, (True, True, False))])
    with pytest.raises(ValueError, match="at least one site"):
        class_aware_head(w, w, [])


def _reply(reply: Callable[..., Message], node: int, value: float, cases: int, flags: tuple[bool, ...]) -> Message:
    message = reply(node, _weights(value), cases=cases, site=f"s{node}")
    message.content.config_records["site"] = ConfigRecord({"name": f"s{node}", "annotated": list(flags)})
    return message


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("name", "class_aware"), [("fedavg", True), ("fedprox", True), ("fedadam", False)])
def test_strategy_applies_it_for_fedavg_and_fedprox(
    reply: Callable[..., Message], name: str, class_aware: bool
) -> None:
    strategy = RecordingStrategy(
        build_strategy(ServerConfig(strategy=StrategyConfig(name=name))), 2, 1, 1.0, limits=CASE_WEIGHTS
    )  # type: ignore[arg-type]
    arrays = ArrayRecord({k: Array(v) for k, v in _weights(-1.0).items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))  # type: ignore[arg-type]
    assert strategy.family.class_aware_head is class_aware
    if not class_aware:
        return
    new, _ = strategy.aggregate_train(1, [_reply(reply, 1, 1.0, 1, A_FLAGS), _reply(reply, 2, 5.0, 3, B_FLAGS)])
    assert new is not None
    np.testing.assert_allclose(new["final.bias"].numpy(), [4.0, 1.0, 5.0, -1.0])
    np.testing.assert_allclose(new["conv1.weight"].numpy(), [4.0, 4.0, 4.0])


@pytest.mark.usefixtures("task_identity")
def test_a_reply_without_flags_leaves_plain_fedavg(reply: Callable[..., Message]) -> None:
    strategy = RecordingStrategy(build_strategy(ServerConfig()), 2, 1, 1.0, limits=CASE_WEIGHTS)
    list(
        strategy.configure_train(
            1, ArrayRecord({k: Array(v) for k, v in _weights(-1.0).items()}), ConfigRecord(), FakeGrid([1, 2])
        )
    )  # type: ignore[arg-type]
    new, _ = strategy.aggregate_train(
        1, [_reply(reply, 1, 1.0, 1, A_FLAGS), reply(2, _weights(5.0), cases=3, site="b")]
    )
    assert new is not None
    np.testing.assert_allclose(new["final.bias"].numpy(), [4.0] * 4)


def test_the_reply_carries_the_sites_classes() -> None:
    result = LocalResult(cases=2, loss=0.1, samples=4, seconds=1.0, annotated=A_FLAGS)
    content = reply_content(ArrayRecord(), result, "a")
    assert annotated_of(content) == A_FLAGS
    plain = reply_content(ArrayRecord(), LocalResult(cases=2, loss=0.1, samples=4, seconds=1.0), "a")
    assert annotated_of(plain) is None
