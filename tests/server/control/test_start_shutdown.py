"""`fed-server start` as a real process: Ctrl-C, a failing ServerApp and ``kill -9`` leave no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedseg.common.runtime.processes import free_port, tagged_processes
from fedseg.server.run.history import read_history

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")]

TAG = "FEDSEG_TEST_TAG"
FED_SERVER = [sys.executable, "-c", "from fedseg.server.cli.main import main; main()"]


def _start(args: list[str], tag: str) -> subprocess.Popen[str]:
    env = dict(os.environ, **{TAG: tag, "COLUMNS": "200"})
    return subprocess.Popen([*FED_SERVER, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_gone(tag: str, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := tagged_processes(tag, TAG)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_ctrl_c_stops_superlink_serverapp_and_all_helpers(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    out = tmp_path / "run"
    proc = _start(["start", f"output_dir={out}", "min_sites=1", f"port={free_port()}"], tag)
    deadline = time.monotonic() + 400  # a ceiling for a loaded machine; the loop ends on the history row
    while not read_history(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)  # round 0 recorded = the ServerApp is up and waiting for sites
    assert read_history(out), "the ServerApp never recorded round 0"
    assert len(tagged_processes(tag, TAG)) >= 4  # fed-server, superlink, executor, gateway, serverapp
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "error: interrupted" in output
    assert time.monotonic() - started < 60  # SIGTERM, then SIGKILL after 10 s: never a hang
    assert _wait_gone(tag) == []


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def test_kill_9_of_fed_server_takes_every_process_with_it(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    proc = _start(["start", f"output_dir={tmp_path / 'run'}", "min_sites=1", f"port={free_port()}"], tag)
    deadline = time.monotonic() + 300  # a ceiling for a loaded machine; the loop ends when the ServerApp is up
    serverapp: list[str] = []
    while not serverapp and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        found = [_cmdline(p) for p in tagged_processes(tag, TAG)]
        serverapp = next((c for c in found if any(part.endswith("flwr-serverapp") for part in c)), [])
    assert serverapp, "the ServerApp process never started"
    assert "--token" not in serverapp and "--token-file" in serverapp  # the task token is not in `ps`
    proc.kill()
    proc.wait()
    assert _wait_gone(tag, timeout=15.0) == []  # parent-death signals: no orphan retries a dead SuperLink


def test_failing_serverapp_is_reported_in_one_line_and_cleaned_up(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    empty = tmp_path / "central"
    empty.mkdir()
    proc = _start(
        ["start", f"output_dir={tmp_path / 'run'}", f"validation.data={empty}", "min_sites=1", f"port={free_port()}"],
        tag,
    )
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 1, output
    assert "failed: fedseg.common.errors.DataError: " in output
    assert "dataset folder is empty" in output
    assert _wait_gone(tag) == []


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        tag = uuid.uuid4().hex
        proc = _start(["start", f"output_dir={tmp_path / 'run'}", f"port={port}"], tag)
        output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 1, output
    assert f"port {port} on 127.0.0.1 is in use" in output
    assert _wait_gone(tag) == []
