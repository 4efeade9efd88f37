"""One ``fed-server`` per output folder and port, refused before anything is written.

A second ``fed-server start`` on the folder of a running one must not touch its connection file or logs, not even
on its way to failing. :func:`hold_output_dir` takes an exclusive ``flock`` on ``<output_dir>/.fedseg/server.lock``
first (the kernel releases it when the process ends, however it ends) and :func:`check_port_free` refuses a busy
public port at once, before a readiness check could be answered by the other server's gateway.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from fedseg.common.errors import FedsegError

LOCK_FILE = "server.lock"


def hold_output_dir(private: Path) -> IO[str]:
    """Lock ``private`` (the run's ``.fedseg`` folder) for this process; keep the returned file open to hold it.

    Raises:
        FedsegError: another process holds it (its pid named).
    """
    private.mkdir(parents=True, exist_ok=True)
    handle = (private / LOCK_FILE).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise FedsegError(
            f"another fed-server is running in {private.parent} (pid {owner}); stop it or choose another output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def check_port_free(host: str, port: int, setting: str = "port") -> None:
    """Refuse at once when ``host:port`` cannot be bound (another server, or any other program, has it);
    ``setting`` is the server.toml key that moves it.

    Raises:
        FedsegError: the port is in use or the address is not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise FedsegError(f"port {port} on {host} is in use (another fed-server?); set {setting}=...") from None
            raise FedsegError(f"cannot listen on {host}:{port}: {err.strerror}") from None
