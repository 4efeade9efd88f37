"""A second fed-server on a running one's folder or port fails at once, in one line, and writes nothing there."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.common.errors import FedsegError
from fedseg.common.runtime.processes import Supervisor, free_port
from fedseg.server.cli.main import app
from fedseg.server.config import ServerConfig
from fedseg.server.control.launch import start_server
from fedseg.server.control.lock import hold_output_dir
from fedseg.server.control.runs import PRIVATE_DIR

runner = CliRunner()
Snapshot = dict[Path, tuple[bytes, int]]


def running_server_files(out: Path) -> Snapshot:
    """What a running server has in its folder (connection file, a log, round 0's history), bytes and mtime."""
    files = {
        out / PRIVATE_DIR / "flwr-home" / "config.toml": b"[superlink]\n",
        out / "logs" / "superlink.log": b"up\n",
        out / "history.json": b"[]\n",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return snapshot(out)


def snapshot(out: Path) -> Snapshot:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file() and p.suffix != ".lock"}


def test_a_second_server_on_a_held_folder_is_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    files = running_server_files(out)
    held = hold_output_dir(out / PRIVATE_DIR)  # the running server
    cfg = ServerConfig(output_dir=out, port=free_port("127.0.0.1"))
    started = time.monotonic()
    with (
        Supervisor() as sup,
        pytest.raises(FedsegError, match=rf"another fed-server is running in .*run \(pid {os.getpid()}\)"),
    ):
        start_server(sup, cfg)
    assert time.monotonic() - started < 5
    assert snapshot(out) == files  # nothing of the running server's was touched
    held.close()
    hold_output_dir(out / PRIVATE_DIR).close()  # free again once its holder is gone


def test_fed_server_start_on_a_running_servers_folder_says_so_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    files = running_server_files(out)  # round 0 is in its history: the old start said "already holds a run"
    held = hold_output_dir(out / PRIVATE_DIR)
    result = runner.invoke(app, ["start", f"output_dir={out}", f"port={free_port()}"])
    held.close()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: another fed-server is running in {out} (pid {os.getpid()})"), lines
    assert snapshot(out) == files


@pytest.fixture
def other_gateway() -> Iterator[int]:
    """Another server's gateway: it answers HTTP on its port (404 to ``GET /``, as ours does)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_port_answered_by_another_gateway_fails_at_once_and_frees_the_folder(
    tmp_path: Path, other_gateway: int
) -> None:
    # the old readiness check took the other gateway's 404 for ours: start "succeeded" with no gateway of its own
    out = tmp_path / "run"
    cfg = ServerConfig(output_dir=out, port=other_gateway)
    started = time.monotonic()
    with Supervisor() as sup, pytest.raises(FedsegError, match=f"port {other_gateway} on 127.0.0.1 is in use") as err:
        start_server(sup, cfg)
    assert time.monotonic() - started < 5
    assert snapshot(out) == {}  # no connection file, no logs
    hold_output_dir(out / PRIVATE_DIR).close()  # the failed start let go of the folder at once
    assert "set port=..." in str(err.value)


def test_a_busy_configured_internal_port_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as other:  # e.g. another server's SuperLink, whose /health would answer for ours
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        cfg = ServerConfig(output_dir=tmp_path / "run", port=free_port(), internal_port=port)
        with Supervisor() as sup, pytest.raises(FedsegError, match=f"port {port} on 127.0.0.1 .*set internal_port="):
            start_server(sup, cfg)
    assert snapshot(tmp_path / "run") == {}


def test_a_busy_public_port_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        cfg = ServerConfig(output_dir=tmp_path / "run", port=port)
        started = time.monotonic()
        with Supervisor() as sup, pytest.raises(FedsegError, match=f"port {port} on 127.0.0.1 is in use"):
            start_server(sup, cfg)
        assert time.monotonic() - started < 5
    assert not (tmp_path / "run" / PRIVATE_DIR / "flwr-home" / "config.toml").exists()
