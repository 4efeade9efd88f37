"""The ServerApp's telemetry grid: each reply reported as it arrives, silent sites reported at the timeout."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

from fedseg.common.runtime.events import EventTail, EventWriter
from fedseg.server.run.telemetry import PULL_BATCH, PULL_EVERY, ServerTelemetry, TelemetryGrid

pytestmark = pytest.mark.usefixtures("task_identity")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class ScriptedGrid:
    """Answers pulls from a script: (arrival time on ``clock``, node, reply maker); a reply is returned once it has
    arrived and its message id is asked for."""

    def __init__(self, script: list[tuple[float, int, Callable[[str], Message]]], nodes: list[int], clock: FakeClock):
        self.script = list(script)
        self.nodes = nodes
        self.clock = clock
        self.asked: list[int] = []  # ids asked for per pull
        self.ids: dict[int, str] = {}

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        out = []
        for message in messages:
            self.ids[message.metadata.dst_node_id] = f"m{message.metadata.dst_node_id}"
            out.append(self.ids[message.metadata.dst_node_id])
        return out

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        self.asked.append(len(wanted))
        due = [s for s in self.script if s[0] <= self.clock.now and self.ids[s[1]] in wanted]
        self.script = [s for s in self.script if s not in due]
        return [make(self.ids) for _, _, make in due]  # type: ignore[arg-type]


def test_replies_are_reported_one_by_one_and_silent_sites_at_the_timeout(
    tmp_path: Path, reply: Callable[..., Message], failed_reply: Callable[..., Message]
) -> None:
    weights = {"w": np.ones((4,), np.float32)}

    def answer(node: int, **kwargs: object) -> Callable[[dict[int, str]], Message]:
        def make(ids: dict[int, str]) -> Message:
            message = reply(node, weights, 3, **kwargs) if kwargs else failed_reply(99, "node lost")
            message.metadata.__dict__["_reply_to_message_id"] = ids[node]
            return message

        return make

    # site-a answers after one pull interval; after three, an error made by the SuperLink (its source is not the
    # site) for node 2
    clock = FakeClock()
    script = [(0.9 * PULL_EVERY, 1, answer(1, site="site-a")), (2.9 * PULL_EVERY, 2, answer(2))]
    inner = ScriptedGrid(script, nodes=[1, 2, 3], clock=clock)
    path = tmp_path / "events.jsonl"
    telemetry = ServerTelemetry(EventWriter(path, clock=clock), first_round=1)
    grid = TelemetryGrid(inner, telemetry, min_sites=3, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    assert grid.get_node_ids() == [1, 2, 3]
    grid.get_node_ids()  # unchanged: not reported again
    record = ArrayRecord({"w": Array(np.zeros((4,), np.float32))})
    outgoing = [
        Message(RecordDict({"arrays": record}), dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2, 3)
    ]
    replies = list(grid.send_and_receive(outgoing, timeout=10.0))
    assert len(replies) == 2
    events = EventTail(path).read()
    kinds = [e["kind"] for e in events]
    assert kinds == ["sites", "phase", "sampled", "reply", "reply", "missing", "phase"]
    replies_seen = [
        (e["site"], e["outcome"], e["bytes_out"], e["bytes_in"], e["seconds"]) for e in events if e["kind"] == "reply"
    ]
    size = record.count_bytes()  # the same serialised size as the history's bytes_out
    assert replies_seen == [
        ("site-a", "ok", size, size, pytest.approx(1 * PULL_EVERY)),
        ("node-2", "error", size, 0, pytest.approx(3 * PULL_EVERY)),
    ]
    assert [(e["site"], e["bytes_out"]) for e in events if e["kind"] == "missing"] == [("node-3", size)]
    assert events[0] == {"t": 0.0, "kind": "sites", "connected": 3, "needed": 3}
    assert [e["phase"] for e in events if e["kind"] == "phase"] == ["training", "aggregating"]
    assert clock.now == pytest.approx(10.0, abs=PULL_EVERY)  # pulled every PULL_EVERY seconds until the timeout
    assert max(inner.asked) == PULL_BATCH  # a few replies at a time: memory stays flat with many sites


def test_no_wait_for_a_round_after_the_last(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    telemetry = ServerTelemetry(EventWriter(path), first_round=1, last_round=2)
    evaluate = telemetry.timed(lambda server_round, arrays: None)
    for server_round in (0, 1, 2):
        evaluate(server_round, ArrayRecord())
    phases = [(e["round"], e["phase"]) for e in EventTail(path).read()]
    assert phases == [(0, "validating"), (1, "waiting"), (1, "validating"), (2, "waiting"), (2, "validating")]
