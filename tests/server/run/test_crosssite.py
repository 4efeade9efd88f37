"""Cross-site validation, server side: when it runs, the messages, the matrix from the replies, the history row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.fl.offline import from_site
from fedseg.common.fl.packing import is_packed, unpacked
from fedseg.common.fl.protocol import TrainTask, evaluate_content, failure_content, task_config
from fedseg.common.nn.model import ModelConfig
from fedseg.server.config import ServerConfig
from fedseg.server.run.crosssite import CrossSite, matrix_of
from fedseg.server.run.history import History, RoundRow, read_history
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from tests.server.conftest import error_reply
from tests.server.run.test_strategy import FakeGrid


def _evaluate_reply(node: int, content: RecordDict) -> Message:
    return from_site(content, node, MessageType.EVALUATE)


def test_due_every_n_rounds_and_at_the_end() -> None:
    assert [r for r in range(1, 8) if CrossSite(3, 7).due(r)] == [3, 6, 7]
    assert [r for r in range(1, 8) if CrossSite(0, 7).due(r)] == [7]
    assert not any(CrossSite(None, 7).due(r) for r in range(1, 8))


@pytest.mark.usefixtures("task_identity")
def test_messages_go_to_every_site_with_the_task_only_when_due() -> None:
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    messages = CrossSite(2, 5).messages(2, arrays, ConfigRecord({"fedseg-task": "{}"}), FakeGrid([4, 9]))  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in messages] == [4, 9]
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in messages)
    assert messages[0].content.config_records["config"]["server-round"] == 2
    assert CrossSite(2, 5).messages(3, arrays, ConfigRecord(), FakeGrid([4, 9])) == []  # type: ignore[arg-type]


def test_matrix_from_replies_skips_failures() -> None:
    scores = {"dice-liver-mean": 0.8, "dice-liver-sd": 0.1, "dice-liver-n": 3, "hd95-liver-n": 0}
    replies = [_evaluate_reply(1, evaluate_content(scores, 3, "a")), error_reply(2)]
    matrix = matrix_of(replies)
    assert matrix == {"a": {"liver": {"dice": {"mean": 0.8, "sd": 0.1, "n": 3.0}, "hd95": {"n": 0.0}}}}


def test_a_refused_scoring_is_logged_with_the_sites_reason(caplog: pytest.LogCaptureFixture) -> None:
    refusal = "site policy refuses cross-site scoring (cross_site = false)"
    with caplog.at_level("WARNING"):
        assert matrix_of([_evaluate_reply(3, failure_content("c", refusal))]) == {}
    assert f"no scores from c (site failure: {refusal})" in caplog.text


def test_strategy_records_the_matrix_and_the_history_keeps_it(tmp_path: Path) -> None:
    strategy = RecordingStrategy(build_strategy(ServerConfig()), 2, 1, 1.0, cross_site=CrossSite(1, 2))
    reply = _evaluate_reply(1, RecordDict({"metrics": MetricRecord({"num-examples": 2, "dice-spleen-n": 2})}))
    assert strategy.aggregate_evaluate(1, [reply]) is None
    matrix = strategy.stats[1].cross_site
    assert matrix == {"node-1": {"spleen": {"dice": {"n": 2.0}}}}
    history = History(tmp_path)
    history.append(RoundRow(round=1, seconds=1.0, cross_site=matrix))
    assert read_history(tmp_path)[0].cross_site == matrix


@pytest.mark.usefixtures("task_identity")
def test_cross_site_weights_travel_packed_like_the_train_task() -> None:
    weights = {"w": np.arange(3, dtype=np.float32), "n": np.array(7, np.int64)}
    task = TrainTask(model=ModelConfig(), train=TrainConfig(), preprocess=PreprocessConfig(), deadline=9.0, packed=True)
    strategy = RecordingStrategy(build_strategy(ServerConfig()), 2, 1, 1.0, cross_site=CrossSite(1, 2))
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    messages = list(strategy.configure_evaluate(1, arrays, task_config(task), FakeGrid([4, 9])))  # type: ignore[arg-type]
    sent = messages[0].content.array_records["arrays"]
    assert len(messages) == 2 and is_packed(sent) and list(sent.keys()) == ["fedseg-packed"]
    back = unpacked(sent, weights, "fp32")
    assert {k: back[k].numpy().tolist() for k in back} == {"w": [0.0, 1.0, 2.0], "n": 7}
