"""The server's public side: refuse insecure exposure, then start the fleet-only gateway and wait until it serves."""

from __future__ import annotations

import logging
import os
import ssl
import sys
import urllib.error
import urllib.request

from fedseg.common.errors import ConfigError, FedsegError
from fedseg.common.runtime.processes import Child, Supervisor, host_port
from fedseg.server.config import ServerConfig
from fedseg.server.control.superlink import internal_url, local_address, wait_answering

log = logging.getLogger(__name__)


def check_exposure(cfg: ServerConfig) -> None:
    """Refuse to serve a non-loopback address over plain HTTP unless ``insecure = true``.

    Raises:
        ConfigError: ``host`` is not loopback, there is no ``[tls]`` table and ``insecure`` is not set.
    """
    if cfg.tls is None and not cfg.loopback and not cfg.insecure:
        raise ConfigError(
            f"refusing to serve {cfg.address} over plain HTTP: sites' weights and the node handshake would travel "
            "unencrypted; add a [tls] table (make one with `fed-server certs`) or pass --insecure"
        )
    if cfg.tls is None and not cfg.loopback:
        log.warning("serving %s without TLS (--insecure): traffic and weights travel unencrypted", cfg.address)


def gateway_argv(cfg: ServerConfig, internal_port: int) -> list[str]:
    """Command line of the gateway: public ``host:port`` -> SuperLink on loopback, TLS as configured."""
    argv = [
        sys.executable,
        "-m",
        "fedseg.server.control.gateway",
        "--listen",
        host_port(cfg.host, cfg.port),
        "--upstream",
        internal_url(cfg, internal_port),
        "--parent-pid",
        str(os.getpid()),
        "--max-body",
        str(cfg.gateway.max_body_mib * 2**20),
        "--max-bodies",
        str(cfg.gateway.max_uploads),
    ]
    if cfg.tls is not None:
        argv += ["--upstream-ca", str(cfg.tls.ca), "--certfile", str(cfg.tls.cert), "--keyfile", str(cfg.tls.key)]
    return argv


def _answers(cfg: ServerConfig, timeout: float = 2.0) -> bool:
    """Whether the gateway answers HTTP(S) on the public side (it replies 404 to ``GET /``)."""
    scheme = "http" if cfg.tls is None else "https"
    context = ssl.create_default_context(cafile=str(cfg.tls.ca)) if cfg.tls is not None else None
    try:
        with urllib.request.urlopen(f"{scheme}://{local_address(cfg)}/", timeout=timeout, context=context):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def start_gateway(sup: Supervisor, cfg: ServerConfig, internal_port: int, timeout: float = 60.0) -> Child:
    """Start the fleet-only gateway on the public address under ``sup`` and return once it answers.

    Raises:
        FedsegError: it exited (port in use, unreadable certificate) or did not answer in time.
    """
    log_path = cfg.output_dir / "logs" / "gateway.log"
    child = sup.start("gateway", gateway_argv(cfg, internal_port), log_path=log_path)
    what = f"the gateway on {cfg.address}"
    hint = f"is port {cfg.port} in use? set port=..."
    try:
        wait_answering(child, lambda: _answers(cfg), what, hint, timeout, tail_lines=2)
    except TimeoutError:
        raise FedsegError(
            f"the gateway did not answer on {cfg.address} within {timeout:.0f} s; see {log_path}"
        ) from None
    log.info("gateway serving the Fleet API on %s (log: %s)", cfg.address, log_path)
    return child
