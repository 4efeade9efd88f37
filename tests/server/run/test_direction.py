"""The direction check (``min_update_cosine``): an update pointing away from the round's coordinate-wise median
update is rejected, with three or more replies, over the weights only (not BatchNorm running statistics)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from pydantic import ValidationError

from fedseg.common.fl.offline import train_reply
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.history import History, RoundRow, SiteRound, csv_record, read_history
from fedseg.server.run.replies import direction_outliers, update_cosines
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from tests.server.run.test_rogue_replies import GLOBAL, HONEST_CASES, Weights

pytestmark = pytest.mark.usefixtures("task_identity")

CASES = HONEST_CASES
DIRECTION = 0.01 * np.array([[1.0, 2.0, -1.0], [0.5, 1.0, -2.0]])


def honest(node: int) -> Weights:
    """A step along a shared direction, a little site-specific noise; BatchNorm statistics differ widely."""
    noise = 0.002 * np.random.default_rng(node).standard_normal((2, 3))
    return {
        "conv.weight": (GLOBAL["conv.weight"] + (1 + 0.1 * node) * DIRECTION + noise).astype(np.float32),
        "bn.running_mean": np.full(3, 0.3 * node - 0.5, np.float32),
        "bn.running_var": np.full(3, 0.5 + 0.1 * node, np.float32),
        "bn.num_batches_tracked": np.array(4 + node, np.int64),
    }


def flipped(node: int) -> Weights:
    """The sign-flip attack: w_global − (w_trained − w_global) on every floating-point array."""
    return {k: (2 * GLOBAL[k] - v).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in honest(node).items()}


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def one_round(replies: dict[int, Weights], min_cosine: float = 0.0) -> tuple[RecordingStrategy, ArrayRecord | None]:
    limits = StrategyConfig(min_update_cosine=min_cosine)
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=2)), 2, 1, 1.0, limits=limits)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(list(replies))))  # type: ignore[arg-type]
    messages: list[Message] = [train_reply(n, w, CASES[n], site=f"site-{n}") for n, w in replies.items()]
    return strategy, strategy.aggregate_train(1, messages)[0]


def test_cosines_reached_by_half_of_the_other_updates_by_hand() -> None:
    reference = {"a": np.array([0.5, 0.5], np.float32), "b": np.array([1.0], np.float32)}

    def update(x: float, y: float, z: float) -> Weights:
        return {"a": reference["a"] + np.array([x, y], np.float32), "b": reference["b"] + np.float32(z)}

    # (2, 1, 0) and (1, 2, 0): cosine 4/5 with each other, -3/sqrt(15) with (-1, -1, 1); three updates: the larger
    three = [update(2, 1, 0), update(1, 2, 0), update(-1, -1, 1)]
    got = update_cosines(three, reference)
    np.testing.assert_allclose(got, [0.8, 0.8, -3 / math.sqrt(15)], atol=1e-7)
    # with (1, 1, 1) (cosines 3/sqrt(15), 3/sqrt(15), -1/3): the second largest of three
    got = update_cosines([*three, update(1, 1, 1)], reference)
    np.testing.assert_allclose(got, [3 / math.sqrt(15)] * 2 + [-3 / math.sqrt(15), 3 / math.sqrt(15)], atol=1e-7)
    problems = direction_outliers(got, 0.0)
    assert problems[:2] == [None, None] and problems[3] is None
    assert problems[2] == (
        "update direction: half of the other updates reach only cosine -0.775 with it, below min_update_cosine 0"
    )
    assert all(p is not None for p in direction_outliers(got, 0.8))
    assert direction_outliers(got, -1.0) == [None] * 4  # -1 = off: no cosine is below -1


def test_two_updates_or_a_zero_update_have_no_direction() -> None:
    reference = {"a": np.zeros(2, np.float32)}
    two = [{"a": np.array([1.0, 0.0], np.float32)}, {"a": np.array([-1.0, 0.0], np.float32)}]
    assert all(math.isnan(c) for c in update_cosines(two, reference))
    cosines = update_cosines([*two, {"a": np.zeros(2, np.float32)}], reference)  # cosine 0 with a zero update
    assert cosines[:2] == [0.0, 0.0] and math.isnan(cosines[2])
    assert direction_outliers([math.nan], 0.5) == ["update has no direction (zero)"]  # a NaN never passes
    assert direction_outliers([math.nan], -1.0) == [None]  # unless the check is off


@pytest.mark.parametrize("bad", [-1.5, 1.0, 2.0])
def test_min_update_cosine_is_validated(bad: float) -> None:
    with pytest.raises(ValidationError, match="min_update_cosine"):
        StrategyConfig(min_update_cosine=bad)


def test_a_flipped_reply_among_three_is_rejected_and_fedavg_of_the_honest_ones_stands() -> None:
    strategy, aggregate = one_round({1: honest(1), 2: honest(2), 3: flipped(3)})
    stats = strategy.stats[1]
    assert [s.site for s in stats.sites] == ["site-1", "site-2"]
    assert [r.site for r in stats.rejected] == ["site-3"]
    assert stats.rejected[0].reason.startswith("update direction: half of the other updates reach only cosine -")
    assert "below min_update_cosine 0" in stats.rejected[0].reason
    # by hand over conv.weight only: the BatchNorm statistics move 30x more and would dominate if they counted
    u1, u2, u3 = (
        (w["conv.weight"] - GLOBAL["conv.weight"]).astype(np.float64).ravel()
        for w in (honest(1), honest(2), flipped(3))
    )

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    expected = [max(cos(u1, u2), cos(u1, u3)), max(cos(u2, u1), cos(u2, u3))]
    np.testing.assert_allclose([s.update_cosine for s in stats.sites], expected, atol=1e-6)
    assert min(expected) > 0.9 and max(cos(u3, u1), cos(u3, u2)) < -0.9
    assert aggregate is not None
    weight = np.array([CASES[1], CASES[2]], np.float64) / (CASES[1] + CASES[2])
    fedavg = weight[0] * honest(1)["conv.weight"].astype(np.float64) + weight[1] * honest(2)["conv.weight"]
    np.testing.assert_allclose(aggregate["conv.weight"].numpy(), fedavg, rtol=0, atol=1e-6)
    _, alone = one_round({1: honest(1), 2: honest(2)})
    assert alone is not None
    for key in GLOBAL:
        np.testing.assert_array_equal(aggregate[key].numpy(), alone[key].numpy())
    record = csv_record(RoundRow(round=1, seconds=1.0, sites=stats.sites, rejected=stats.rejected))
    assert record["update_cosine_site-1"] == round(float(expected[0]), 6)
    assert record["rejected_site-3"] == stats.rejected[0].reason


def test_with_two_replies_or_the_check_off_a_flipped_reply_is_averaged_in(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    strategy, _ = one_round({1: honest(1), 3: flipped(3)})
    assert strategy.stats[1].rejected == []
    assert [s.update_cosine for s in strategy.stats[1].sites] == [None, None]
    assert any("direction check skipped: 2 replies" in r.getMessage() for r in caplog.records)
    strategy, _ = one_round({1: honest(1), 2: honest(2), 3: flipped(3)}, min_cosine=-1.0)
    stats = strategy.stats[1]
    assert stats.rejected == [] and len(stats.sites) == 3
    cosines = [s.update_cosine for s in stats.sites]
    assert all(c is not None for c in cosines) and cosines[2] is not None and cosines[2] < -0.9


def test_cosines_go_into_history_json_and_older_histories_still_read(tmp_path: Path) -> None:
    site = SiteRound(site="a", cases=2, loss=0.5, samples=8, seconds=1.0, update_norm=0.3, update_cosine=0.125)
    History(tmp_path).append(RoundRow(round=1, seconds=1.0, sites=[site]))
    assert read_history(tmp_path)[0].sites[0].update_cosine == 0.125
    assert "update_cosine_a" in (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    older = json.loads((tmp_path / "history.json").read_text())
    del older[0]["sites"][0]["update_cosine"]
    (tmp_path / "history.json").write_text(json.dumps(older))
    assert read_history(tmp_path)[0].sites[0].update_cosine is None
