"""Start a Flower SuperLink as a supervised subprocess and wait until ``GET /health`` answers."""

from __future__ import annotations

import logging
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from fedseg.common.errors import FedsegError
from fedseg.common.runtime.flwrctl import flower_env, flower_executable
from fedseg.common.runtime.processes import Child, Supervisor, host_port
from fedseg.server.config import ServerConfig

log = logging.getLogger(__name__)

_UNSPECIFIED_HOSTS = ("0.0.0.0", "::", "")


#: The SuperLink (Fleet + Control + Runtime APIs) listens only here; sites reach it through the gateway.
INTERNAL_HOST = "127.0.0.1"


def superlink_argv(cfg: ServerConfig, port: int) -> list[str]:
    """Command line of ``flower-superlink`` for ``cfg`` on loopback ``port``: no runtime dependency installs, and
    ``--isolation process``: it spawns no ServerApp itself, fedseg's executor does (:func:`executor_argv`)."""
    argv = [
        flower_executable("flower-superlink"),
        "--host",
        INTERNAL_HOST,
        "--port",
        str(port),
        "--isolation",
        "process",
        "--disable-runtime-dependency-installation",
    ]
    if cfg.tls is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile",
            str(cfg.tls.ca),
            "--ssl-certfile",
            str(cfg.tls.cert),
            "--ssl-keyfile",
            str(cfg.tls.key),
        ]
    if cfg.database is not None:
        argv += ["--database", str(cfg.database)]
    if cfg.node_auth:
        argv.append("--enable-supernode-auth")
    return argv


def executor_argv(cfg: ServerConfig, port: int, tokens: Path) -> list[str]:
    """Command line of fedseg's server executor (:mod:`fedseg.server.control.executor`) for the SuperLink on
    loopback ``port``; ``tokens`` is the private folder for the ServerApp's token file."""
    argv = [sys.executable, "-m", "fedseg.server.control.executor"]
    argv += ["--runtime-api-address", host_port(INTERNAL_HOST, port), "--tokens", str(tokens)]
    if cfg.tls is not None:
        argv += ["--root-certificates", str(cfg.tls.ca)]
    return argv


def local_address(cfg: ServerConfig) -> str:
    """``host:port`` of the public (gateway) side from this machine (loopback when it listens on all interfaces)."""
    host = "127.0.0.1" if cfg.host in _UNSPECIFIED_HOSTS else cfg.host
    return host_port(host, cfg.port)


def internal_url(cfg: ServerConfig, port: int) -> str:
    """Base URL of the SuperLink on loopback."""
    scheme = "http" if cfg.tls is None else "https"
    return f"{scheme}://{host_port(INTERNAL_HOST, port)}"


def health_url(cfg: ServerConfig, port: int) -> str:
    """The SuperLink's health endpoint (loopback only)."""
    return f"{internal_url(cfg, port)}/health"


def _ssl_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    return ssl.create_default_context(cafile=str(cfg.tls.ca))


def is_healthy(cfg: ServerConfig, port: int, timeout: float = 2.0) -> bool:
    """One ``GET /health`` probe: True on HTTP 200."""
    try:
        with urllib.request.urlopen(health_url(cfg, port), timeout=timeout, context=_ssl_context(cfg)) as answer:
            return int(answer.status) == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def wait_answering(
    child: Child, probe: Callable[[], bool], what: str, hint: str, timeout: float, tail_lines: int = 3
) -> float:
    """Poll ``probe`` until it is true; return the seconds it took.

    Raises:
        FedsegError: ``child`` exited first (``what`` and ``hint`` name it, its log's last lines are quoted).
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if child.process.poll() is not None:
            tail = child.log_tail(tail_lines).replace("\n", " | ")
            raise FedsegError(f"{what} exited with code {child.process.returncode} ({hint}): {tail[-300:]}")
        if probe():
            return time.monotonic() - start
        time.sleep(0.2)
    raise TimeoutError(what)


def wait_healthy(cfg: ServerConfig, child: Child, port: int, timeout: float = 60.0) -> float:
    """Poll ``/health`` until it answers; return the seconds it took.

    Raises:
        FedsegError: the SuperLink exited (its log's last line is quoted) or did not answer in time.
    """
    hint = f"is port {port} in use? set internal_port=..."
    try:
        return wait_answering(child, lambda: is_healthy(cfg, port), "the SuperLink", hint, timeout)
    except TimeoutError:
        raise FedsegError(
            f"the SuperLink did not answer {health_url(cfg, port)} within {timeout:.0f} s; see {child.log_path}"
        ) from None


def start_superlink(
    sup: Supervisor, cfg: ServerConfig, port: int, home: Path, logs: Path, env: Mapping[str, str] | None = None
) -> tuple[Child, Child]:
    """Start the SuperLink on loopback ``port`` and, once it is healthy, the executor that runs the ServerApp.

    Args:
        sup: the supervisor that will stop them (and whose parent-death signal ends them with ``fed-server``).
        cfg: server configuration (TLS, database, node authentication).
        port: its internal loopback port.
        home: FLWR_HOME for the SuperLink and its helpers (the executor keeps token files in ``home/tokens``).
        logs: folder of ``superlink.log`` and ``executor.log``.
        env: extra environment of the executor (inherited by the ServerApp process).

    Returns:
        The SuperLink and the executor.

    Raises:
        FedsegError: it failed to start (port in use, bad certificates, ...).
    """
    log_path = logs / "superlink.log"
    child = sup.start("superlink", superlink_argv(cfg, port), env=flower_env(home), log_path=log_path)
    seconds = wait_healthy(cfg, child, port)
    log.info("SuperLink up on %s after %.1f s (log: %s)", host_port(INTERNAL_HOST, port), seconds, log_path)
    argv = executor_argv(cfg, port, home / "tokens")
    executor = sup.start("executor", argv, env=flower_env(home, env), log_path=logs / "executor.log")
    return child, executor
