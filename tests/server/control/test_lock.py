"""A second fed-server on a running one's folder or port fails at once, in one line, and writes nothing there."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from fedseg.common.errors import FedsegError
from fedseg.common.runtime.processes import Supervisor, free_port
from fedseg.server.config import ServerConfig
from fedseg.server.control.launch import start_server
from fedseg.server.control.lock import hold_output_dir
from fedseg.server.control.runs import PRIVATE_DIR


def running_server_files(out: Path) -> dict[Path, bytes]:
    """What a running server has in its folder: its connection file and a log."""
    files = {out / PRIVATE_DIR / "flwr-home" / "config.toml": b"[superlink]\n", out / "logs" / "superlink.log": b"up\n"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


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
    assert {p: p.read_bytes() for p in files} == files  # nothing of the running server's was touched
    held.close()
    hold_output_dir(out / PRIVATE_DIR).close()  # free again once its holder is gone


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
