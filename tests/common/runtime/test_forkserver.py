"""The fork server: children run the entry point with the modules already imported, and die with the server."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec

from fedseg.common.runtime.appexec import TokenFileExecutor
from fedseg.common.runtime.forkserver import ForkServer, ForkServerError, exited, pidfd_supported, watch

THREADED = """
import threading, time
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()  # a thread left running at import
"""

ENTRY = """
import json, os, sys, time
IMPORTED_IN = os.getpid()

def main():
    out, code, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    with open(out + ".tmp", "w") as f:
        json.dump({"argv": sys.argv, "imported_in": IMPORTED_IN, "pid": os.getpid(), "ppid": os.getppid()}, f)
    os.replace(out + ".tmp", out)
    time.sleep(pause)
    return code

def record_argv():
    with open(os.environ["FS_OUT"] + ".tmp", "w") as f:
        json.dump(sys.argv, f)
    os.replace(os.environ["FS_OUT"] + ".tmp", os.environ["FS_OUT"])
"""


@pytest.fixture
def entry_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "fs_entry.py").write_text(ENTRY)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "fs_entry"


def _until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def _ended(pid: int) -> bool:
    """Gone, or a zombie (an orphan may be re-parented to this process when an earlier test made it a subreaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_children_run_the_entry_with_the_preloaded_modules_and_their_exit_is_seen(
    entry_module: str, tmp_path: Path
) -> None:
    server = ForkServer([entry_module], f"{entry_module}:main")
    try:
        out = tmp_path / "child.json"
        pid = server.spawn(["prog", str(out), "3", "0"])
        pidfd = watch(pid)
        _until(lambda: exited(pidfd))
        seen = json.loads(out.read_text())
        assert seen["argv"] == ["prog", str(out), "3", "0"]
        assert seen["pid"] == pid and seen["ppid"] == server.process.pid
        assert seen["imported_in"] == server.process.pid  # imported once in the server, not again in the child
        assert pidfd is not None
        os.close(pidfd)
        second = server.spawn(["prog", str(tmp_path / "second.json"), "0", "0"])  # the server serves again
        assert second != pid
    finally:
        server.close()


def test_a_failed_import_is_one_error_for_the_caller(tmp_path: Path) -> None:
    server = ForkServer(["fedseg_no_such_module"], "fedseg_no_such_module:main")
    try:
        with pytest.raises(ForkServerError, match="fedseg_no_such_module"):
            server.spawn(["prog"])
    finally:
        server.close()


def test_children_die_with_the_server(entry_module: str, tmp_path: Path) -> None:
    server = ForkServer([entry_module], f"{entry_module}:main")
    out = tmp_path / "long.json"
    pid = server.spawn(["prog", str(out), "0", "600"])
    _until(out.exists)  # the child is up and sleeping
    os.kill(server.process.pid, signal.SIGKILL)
    _until(lambda: _ended(pid))
    server.close()
    with pytest.raises(ForkServerError):
        server.spawn(["prog"])


def _spec(task_id: int) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=TaskType.CLIENT_APP,
        runtime_api_address="127.0.0.1:5",
        token="ab" * 32,
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=None,
        suppress_output=False,
        task_id=task_id,
    )


def test_the_executor_forks_warm_apps_and_cleans_their_token_files(
    entry_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FS_OUT", str(tmp_path / "argv.json"))
    server = ForkServer([entry_module], f"{entry_module}:record_argv")
    executor = TokenFileExecutor(tmp_path / "tokens", frozenset({TaskType.CLIENT_APP}), forkserver=server)
    try:
        assert executor.launch(_spec(9)).status == "accepted"
        assert executor.running == {} and len(executor.forked) == 1
        _until(lambda: (tmp_path / "argv.json").exists())
        argv = json.loads((tmp_path / "argv.json").read_text())
        assert argv[0].endswith("flwr-clientapp") and "--token-file" in argv and "ab" * 32 not in argv

        def collected() -> bool:
            executor.reconcile()
            return not executor.forked

        _until(collected)
        assert list((tmp_path / "tokens").iterdir()) == []
    finally:
        executor.close()


def test_the_executor_starts_apps_the_normal_way_when_the_fork_server_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = ForkServer(["fedseg_no_such_module"], "fedseg_no_such_module:main")
    executor = TokenFileExecutor(tmp_path / "tokens", frozenset({TaskType.CLIENT_APP}), forkserver=server)
    try:
        with caplog.at_level(logging.WARNING):
            assert executor.launch(_spec(4)).status == "accepted"
        assert executor.forkserver is None and len(executor.running) == 1 and not executor.forked
        assert "from scratch" in caplog.text and "fedseg_no_such_module" in caplog.text
        process = next(iter(executor.running))
    finally:
        executor.close()
    assert process.wait(timeout=60) is not None and executor.running == {}  # close() stopped the cold process


def test_a_server_with_a_thread_refuses_to_fork(entry_module: str, tmp_path: Path) -> None:
    (tmp_path / "fs_threaded.py").write_text(THREADED)
    server = ForkServer([entry_module, "fs_threaded"], f"{entry_module}:main")
    try:
        with pytest.raises(ForkServerError, match="2 threads in the fork server; refusing to fork"):
            server.spawn(["prog", str(tmp_path / "never.json"), "0", "0"])
        assert not (tmp_path / "never.json").exists()
    finally:
        server.close()


def test_pidfd_support_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pidfd_supported()  # Linux 5.3+ here, as on CI

    def missing(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", missing)
    assert not pidfd_supported()
