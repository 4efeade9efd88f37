"""The gate notes each ClientApp process it starts (the round anatomy's spawn mark), and none it refuses; and
`fed-client join` runs its SuperNode only next to an active gate."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.proto.task_pb2 import Task
from flwr.supercore.superexec import run_superexec as superexec
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.plugin import AutoExecPlugin

from fedseg.client import gate
from fedseg.client.gate import GATE_ACTIVE, GatedPlugin
from fedseg.client.trust import fedseg_fab_hash
from fedseg.common.runtime.events import EventTail, EventWriter
from fedseg.common.runtime.processes import descendants, free_port

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


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def _option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_join_runs_the_supernode_only_next_to_an_active_gate(phantom_root: Path, tmp_path: Path) -> None:
    """The launch path of `fed-client join` (no SuperLink needed: the SuperNode retries while the gate comes up)."""
    workdir, port = tmp_path / "work", free_port()
    cli = "from fedseg.client.cli.main import main; main()"
    args = ["join", "--site", "s1", "--data", str(phantom_root / "site-1"), "--server", f"127.0.0.1:{free_port()}",
            "--workdir", str(workdir), "--port", str(port), "--cold-start"]  # fmt: skip
    join = subprocess.Popen([sys.executable, "-c", cli, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gate_log = workdir / "logs" / "gate.log"
    try:
        deadline = time.monotonic() + 60
        while GATE_ACTIVE not in (gate_log.read_text() if gate_log.is_file() else "") and join.poll() is None:
            assert time.monotonic() < deadline, "no gate became active next to the SuperNode"
            time.sleep(0.1)
        assert join.poll() is None, "join exited"
        tree = {pid: _cmdline(pid) for pid in descendants(join.pid)}
    finally:
        join.terminate()
        join.wait(timeout=60)
    supernodes = [argv for argv in tree.values() if argv[1:3] == ["-m", "fedseg.client.pollnode"]]
    gates = [argv for argv in tree.values() if argv[1:3] == ["-m", "fedseg.client.gate"]]
    assert len(supernodes) == 1 and len(gates) == 1, tree
    assert _option(supernodes[0], "--isolation") == ["process"]  # Flower's own, ungated SuperExec is not started
    assert _option(supernodes[0], "--port") == [str(port)]
    assert _option(gates[0], "--runtime-api-address") == [f"127.0.0.1:{port}"]  # the gate serves that SuperNode
    assert _option(gates[0], "--trust") == [fedseg_fab_hash()]
    assert not [argv for argv in tree.values() if any("superexec" in arg for arg in argv)], tree
