"""Start a Flower SuperLink as a supervised subprocess and wait until ``GET /health`` answers."""

from __future__ import annotations

import logging
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

from fedseg.common.errors import FedsegError
from fedseg.common.runtime.flwrctl import flower_env, flower_executable
from fedseg.common.runtime.processes import Child, Supervisor, host_port
from fedseg.server.config import ServerConfig

log = logging.getLogger(__name__)

_UNSPECIFIED_HOSTS = ("0.0.0.0", "::", "")


def superlink_argv(cfg: ServerConfig) -> list[str]:
    """Command line of ``flower-superlink`` for ``cfg``: one HTTP(S) port, no runtime dependency installs."""
    argv = [
        flower_executable("flower-superlink"),
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
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
    if cfg.supernode_auth:
        argv.append("--enable-supernode-auth")
    return argv


def local_address(cfg: ServerConfig) -> str:
    """``host:port`` to reach the SuperLink from this machine (loopback when it listens on all interfaces)."""
    host = "127.0.0.1" if cfg.host in _UNSPECIFIED_HOSTS else cfg.host
    return host_port(host, cfg.port)


def health_url(cfg: ServerConfig) -> str:
    """The SuperLink's health endpoint as seen from this machine."""
    scheme = "http" if cfg.tls is None else "https"
    return f"{scheme}://{local_address(cfg)}/health"


def _ssl_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    return ssl.create_default_context(cafile=str(cfg.tls.ca))


def is_healthy(cfg: ServerConfig, timeout: float = 2.0) -> bool:
    """One ``GET /health`` probe: True on HTTP 200."""
    try:
        with urllib.request.urlopen(health_url(cfg), timeout=timeout, context=_ssl_context(cfg)) as answer:
            return int(answer.status) == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def wait_healthy(cfg: ServerConfig, child: Child, timeout: float = 60.0) -> float:
    """Poll ``/health`` until it answers; return the seconds it took.

    Raises:
        FedsegError: the SuperLink exited (its log's last line is quoted) or did not answer in time.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if child.process.poll() is not None:
            tail = child.log_tail(3).replace("\n", " | ")
            raise FedsegError(
                f"the SuperLink exited with code {child.process.returncode} "
                f"(is port {cfg.port} in use? set port=...): {tail[-300:]}"
            )
        if is_healthy(cfg):
            return time.monotonic() - start
        time.sleep(0.3)
    raise FedsegError(f"the SuperLink did not answer {health_url(cfg)} within {timeout:.0f} s; see {child.log_path}")


def start_superlink(sup: Supervisor, cfg: ServerConfig, home: Path, log_path: Path) -> Child:
    """Start the SuperLink under ``sup`` and return once it is healthy.

    Args:
        sup: the supervisor that will stop it.
        cfg: server configuration (host, port, TLS, database).
        home: FLWR_HOME for the SuperLink and its helpers.
        log_path: where its stdout/stderr go.

    Raises:
        FedsegError: it failed to start (port in use, bad certificates, ...).
    """
    if cfg.tls is None and not cfg.loopback:
        log.warning("the SuperLink listens on %s without TLS: traffic and weights travel unencrypted", cfg.host)
    child = sup.start("superlink", superlink_argv(cfg), env=flower_env(home), log_path=log_path)
    seconds = wait_healthy(cfg, child)
    log.info("SuperLink up on %s after %.1f s (log: %s)", local_address(cfg), seconds, log_path)
    return child
