"""Process supervision: whole trees stop, SIGTERM escalates to SIGKILL, escaped sessions are swept by tag."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from fedseg.common.runtime.processes import Supervisor, descendants, free_port, tagged_processes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

# A parent that starts a grandchild in a NEW session (like flower-superexec does) and then waits.
ESCAPING_TREE = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(300)
"""

# A parent that starts a grandchild in a new session and exits at once, orphaning it.
ORPHANING = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
"""

IGNORES_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write("ready")
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(path: Path, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


def test_supervisor_kills_grandchild_that_left_the_session(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild.pid"
    with Supervisor(stop_timeout=5) as sup:
        child = sup.start("tree", [sys.executable, "-c", ESCAPING_TREE, str(marker)], log_path=tmp_path / "t.log")
        grandchild = int(_wait_for(marker))
        assert grandchild in descendants(child.pid)
        assert set(tagged_processes(sup.tag)) >= {child.pid, grandchild}
    assert not _alive(child.pid)
    assert not _alive(grandchild)
    assert tagged_processes(sup.tag) == []


def test_orphan_of_an_exited_child_is_swept_by_tag(tmp_path: Path) -> None:
    marker = tmp_path / "orphan.pid"
    with Supervisor(stop_timeout=5) as sup:
        child = sup.start("orphaner", [sys.executable, "-c", ORPHANING, str(marker)])
        orphan = int(_wait_for(marker))
        child.process.wait(timeout=120)
        assert _alive(orphan)
        assert orphan not in descendants(child.pid)
    assert not _alive(orphan)


def test_sigterm_is_escalated_to_sigkill(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    with Supervisor(stop_timeout=1.0) as sup:
        child = sup.start("stubborn", [sys.executable, "-c", IGNORES_SIGTERM, str(marker)])
        _wait_for(marker)
        start = time.monotonic()
    assert not _alive(child.pid)
    assert child.process.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 15  # killed after the 1 s grace period, far below 300 s of sleep


def test_children_stop_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), Supervisor(stop_timeout=5) as sup:
        child = sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"])
        raise RuntimeError("boom")
    assert not _alive(child.pid)


def test_sigterm_to_us_becomes_keyboard_interrupt(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), Supervisor(stop_timeout=5) as sup:
        child = sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert not _alive(child.pid)
    assert signal.getsignal(signal.SIGTERM) is not None


def test_log_tail_reads_the_childs_output(tmp_path: Path) -> None:
    with Supervisor() as sup:
        child = sup.start("echo", [sys.executable, "-c", "print('one'); print('two')"], log_path=tmp_path / "e.log")
        child.process.wait(timeout=120)
        assert child.log_tail(1) == "two"
