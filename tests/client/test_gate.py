"""The gate notes each ClientApp process it starts (the round anatomy's spawn mark), and none it refuses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flwr.proto.task_pb2 import Task
from flwr.supercore.superexec import run_superexec as superexec
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.plugin import AutoExecPlugin

from fedseg.client import gate
from fedseg.client.gate import GatedPlugin
from fedseg.common.runtime.events import EventTail, EventWriter

TRUSTED = "ab" * 32


def test_launch_event_only_for_trusted_apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[int] = []

    def fake_launch(self: AutoExecPlugin, token: str, task: Task) -> LaunchResult:
        launched.append(int(task.run_id))
        return LaunchResult.accepted()

    monkeypatch.setattr(AutoExecPlugin, "launch_task", fake_launch)
    monkeypatch.setattr(GatedPlugin, "trusted", frozenset({TRUSTED}))
    monkeypatch.setattr(GatedPlugin, "refused", set())
    monkeypatch.setattr(GatedPlugin, "events", EventWriter(tmp_path / "events.jsonl"))
    plugin = GatedPlugin.__new__(GatedPlugin)  # launch_task needs no executor state once Flower's part is faked
    plugin.launch_task("token", Task(run_id=7, fab_hash=TRUSTED))
    plugin.launch_task("token", Task(run_id=8, fab_hash="cd" * 32))
    events = EventTail(tmp_path / "events.jsonl").read()
    assert launched == [7]
    assert [(e["kind"], e["run"]) for e in events] == [("launch", 7)]


def test_the_gate_polls_every_fifth_of_a_second_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []
    monkeypatch.setattr(superexec, "run_superexec", lambda **kw: seen.append(os.environ.get(gate.POLL_ENV)))
    for name in ("trusted", "events"):  # main() sets them; restored afterwards
        monkeypatch.setattr(GatedPlugin, name, getattr(GatedPlugin, name))
    monkeypatch.setattr(superexec, "AutoExecPlugin", vars(superexec)["AutoExecPlugin"])
    monkeypatch.delenv(gate.POLL_ENV, raising=False)
    gate.main(["--runtime-api-address", "127.0.0.1:1", "--events", str(tmp_path / "e.jsonl")])
    monkeypatch.setenv(gate.POLL_ENV, "2.5")
    gate.main(["--runtime-api-address", "127.0.0.1:1"])
    assert seen == ["0.2", "2.5"]
