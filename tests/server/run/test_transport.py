"""Half-precision transport through the recording strategy: half on the wire, float32 aggregation and model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.fl.packing import PACKED_KEY, pack_arrays, unpacked
from fedseg.common.fl.protocol import TrainTask, Transport, task_config
from fedseg.common.fl.weights import encode_arrays
from fedseg.common.nn.model import ModelConfig
from fedseg.server.config import RunSpec, ServerConfig, StrategyConfig
from fedseg.server.run.loop import train_task
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from fedseg.server.run.transport import PACK_ENV

#: FedAvg's own weighting (declared cases), which the hand computations here follow.
CASE_WEIGHTS = StrategyConfig(weighting="cases")

pytestmark = pytest.mark.usefixtures("task_identity")

Reply = Callable[..., Message]


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _task(transport: Transport, packed: bool = False) -> TrainTask:
    return TrainTask(
        model=ModelConfig(),
        train=TrainConfig(),
        preprocess=PreprocessConfig(),
        deadline=60,
        transport=transport,
        packed=packed,
    )


def _global() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((64, 64), 1 / 3, np.float32)), "n": Array(np.array(3, np.int64))})


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("transport", ["fp16", "bf16"])
@pytest.mark.parametrize("strategy_name", ["fedavg", "fedadam"])
def test_half_transport_sends_half_and_aggregates_in_float32(
    transport: Transport, strategy_name: str, packed: bool, reply: Reply
) -> None:
    cfg = ServerConfig(strategy=StrategyConfig(name=strategy_name))  # type: ignore[arg-type]
    strategy = RecordingStrategy(build_strategy(cfg), 2, 1, site_wait_timeout=1.0, limits=CASE_WEIGHTS)
    full = _global()
    task = task_config(_task(transport, packed))
    messages = list(strategy.configure_train(1, full, task, FakeGrid()))  # type: ignore[arg-type]
    sent = messages[0].content.array_records["arrays"]
    if packed:  # one uint8 array: 32-byte digest, 64 x 64 half weights, one int64
        assert list(sent.keys()) == [PACKED_KEY]
        assert sent[PACKED_KEY].numpy().size == 32 + 64 * 64 * 2 + 8
    assert strategy.stats[1].bytes_out == 2 * sent.count_bytes() < 0.6 * 2 * full.count_bytes()
    per_tensor = unpacked(sent, {k: a.numpy() for k, a in full.items()}, transport)
    assert per_tensor["w"].numpy().dtype == (np.float16 if transport == "fp16" else np.int16)
    values = {"a": (1.0 + 2**-12, 1), "b": (4.0, 3)}  # 1 + 2^-12 is not representable in either half type
    replies = []
    for node, (site, (value, cases)) in enumerate(values.items(), start=1):
        weights = ArrayRecord({"w": Array(np.full((64, 64), value, np.float32)), "n": Array(np.array(3, np.int64))})
        wire = encode_arrays(weights, transport)
        replies.append(reply(node, {k: wire[k].numpy() for k in wire}, cases=cases, site=site))
        if packed:
            replies[-1].content["arrays"] = pack_arrays(wire)
    received = sum(r.content.array_records["arrays"].count_bytes() for r in replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and arrays["w"].numpy().dtype.itemsize >= 4  # float32 (FedAdam: float64), not half
    assert strategy.stats[1].bytes_in == received  # counted as they arrived, in half precision
    if strategy_name == "fedavg":  # half rounds 1 + 2^-12 to 1.0: the mean is (1 * 1 + 4 * 3) / 4 in float32
        np.testing.assert_array_equal(arrays["w"].numpy(), np.full((64, 64), 13 / 4, np.float32))


def test_fp32_transport_sends_the_global_model_unchanged() -> None:
    strategy = RecordingStrategy(build_strategy(ServerConfig()), 2, 1, site_wait_timeout=1.0, limits=CASE_WEIGHTS)
    full = _global()
    messages = list(strategy.configure_train(1, full, task_config(_task("fp32")), FakeGrid()))  # type: ignore[arg-type]
    assert messages[0].content.array_records["arrays"]["w"].numpy().dtype == np.float32
    assert strategy.stats[1].bytes_out == 2 * full.count_bytes()


def test_a_packed_fp32_task_sends_one_array_and_takes_packed_and_per_tensor_replies(reply: Reply) -> None:
    strategy = RecordingStrategy(build_strategy(ServerConfig()), 2, 1, site_wait_timeout=1.0, limits=CASE_WEIGHTS)
    full = _global()
    messages = list(strategy.configure_train(1, full, task_config(_task("fp32", True)), FakeGrid()))  # type: ignore[arg-type]
    sent = messages[0].content.array_records["arrays"]
    assert list(sent.keys()) == [PACKED_KEY] and sent[PACKED_KEY].numpy().size == 32 + 64 * 64 * 4 + 8
    assert strategy.stats[1].bytes_out == 2 * sent.count_bytes()
    n = np.array(3, np.int64)
    weights = {"w": np.full((64, 64), 1.0, np.float32), "n": n}
    old_site = reply(1, weights, cases=1, site="a")  # a per-tensor reply is still accepted
    new_site = reply(2, {"w": np.full((64, 64), 4.0, np.float32), "n": n}, cases=3, site="b")
    new_site.content["arrays"] = pack_arrays(new_site.content["arrays"])
    received = [r.content["arrays"].count_bytes() for r in (old_site, new_site)]
    assert received[1] < received[0]  # one npy header instead of two
    arrays, _ = strategy.aggregate_train(1, [old_site, new_site])
    assert arrays is not None and not strategy.stats[1].rejected
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((64, 64), 13 / 4, np.float32))
    assert [s.bytes_in for s in strategy.stats[1].sites] == received  # counted as they arrived


def test_the_server_packs_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = RunSpec(config=ServerConfig())
    monkeypatch.delenv(PACK_ENV, raising=False)
    assert train_task(spec).packed is True
    monkeypatch.setenv(PACK_ENV, "0")  # bench/federation.py --no-pack: per-tensor, for before/after numbers
    assert train_task(spec).packed is False
