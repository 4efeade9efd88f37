"""Drive a whole federated run from ``fed-server``: SuperLink up, run submitted, followed to the end, all stopped.

Everything runs under a :class:`~fedseg.common.runtime.processes.Supervisor`, so the SuperLink, fedseg's executor and
the ServerApp process it starts are gone when the ``with`` block ends, whether the run completed, failed or was
interrupted, and within a second or two when ``fed-server`` itself is killed (parent-death signals all the way down).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedseg.common.errors import FedsegError
from fedseg.common.runtime.flwrctl import FlowerControl, RunStatus, write_connection
from fedseg.common.runtime.processes import Child, Supervisor, free_port, host_port
from fedseg.server.app import EXIT_MARKER, LOG_FILE
from fedseg.server.config import RunSpec, ServerConfig
from fedseg.server.control.front import check_exposure, start_gateway
from fedseg.server.control.lock import check_port_free, hold_output_dir
from fedseg.server.control.registration import register_sites
from fedseg.server.control.runs import (
    PRIVATE_DIR,
    SPEC_ENV,
    SPEC_FILE,
    save_config,
    stage_app,
    write_run_config,
    write_spec,
)
from fedseg.server.control.sites import NODE_SITES_FILE, read_sites
from fedseg.server.control.superlink import INTERNAL_HOST, start_superlink
from fedseg.server.run.history import RoundRow, read_history

log = logging.getLogger(__name__)

#: Seconds between ``flwr ls`` calls (each a new process: 1-3 s of CPU taken from the sites on a small machine)
#: while the ServerApp is still running; its exit marker, written on every normal or failed exit, ends the wait ...
STATUS_EVERY = 30.0
#: ... and once it has written its exit marker.
STATUS_EVERY_AFTER_EXIT = 1.0
#: Consecutive failed ``flwr ls`` calls tolerated (a loaded machine can make one time out).
STATUS_FAILURES = 5
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exceeded|Interrupt)\b.*")


@dataclass
class Server:
    """A running SuperLink (loopback only), the fleet-only gateway in front of it and the ``flwr`` CLI bound to it."""

    cfg: ServerConfig
    superlink: Child
    executor: Child
    control: FlowerControl
    gateway: Child
    internal_port: int
    lock: IO[str] | None = None  # held open for the process's lifetime (fedseg.server.control.lock)

    @property
    def private_dir(self) -> Path:
        """``<output_dir>/.fedseg``: FLWR_HOME, the staged FAB and the run-config file."""
        return self.cfg.output_dir / PRIVATE_DIR


def claim(cfg: ServerConfig) -> IO[str]:
    """Make ``cfg``'s output folder and ports this process's, before anything is written there: refuse insecure
    exposure, lock the folder, check the public (and a configured internal) port is free.

    Keep the returned file open to hold the lock (:func:`start_server` keeps it on its :class:`Server`); it is
    closed again when a check fails.

    Raises:
        ConfigError: a non-loopback address without TLS and without ``insecure``.
        FedsegError: another fed-server holds the folder, or a port is in use.
    """
    check_exposure(cfg)
    lock = hold_output_dir(cfg.output_dir / PRIVATE_DIR)
    try:
        check_port_free(cfg.host, cfg.port)
        if cfg.internal_port:  # else a free one is picked; a busy one would let another SuperLink answer /health
            check_port_free(INTERNAL_HOST, cfg.internal_port, "internal_port")
    except BaseException:
        lock.close()
        raise
    return lock


def start_server(sup: Supervisor, cfg: ServerConfig, claimed: IO[str] | None = None) -> Server:
    """Start the SuperLink on loopback and the fleet-only gateway on ``cfg.address`` under ``sup``.

    Args:
        sup: the supervisor of the processes.
        cfg: the server's configuration.
        claimed: the lock :func:`claim` returned for ``cfg`` (claimed here when None).

    Raises:
        ConfigError: a non-loopback address without TLS and without ``insecure``.
        FedsegError: another fed-server holds the output folder, a port is in use, or a process failed to start.
    """
    lock = claimed if claimed is not None else claim(cfg)  # before anything in the folder is written
    private = cfg.output_dir / PRIVATE_DIR
    home = private / "flwr-home"
    port = cfg.internal_port or free_port(INTERNAL_HOST)
    write_connection(home, host_port(INTERNAL_HOST, port), cfg.tls.ca if cfg.tls is not None else None)
    spec_env = {SPEC_ENV: str((private / SPEC_FILE).resolve())}
    child, executor = start_superlink(sup, cfg, port, home, cfg.output_dir / "logs", spec_env)
    control = FlowerControl(home)
    (private / NODE_SITES_FILE).unlink(missing_ok=True)  # a map from an earlier start names stale node ids
    if cfg.node_auth:
        nodes = register_sites(control, read_sites(cfg.sites_file), private, cfg.database)
        log.info("node authentication on: %d site(s) allowed (%s)", len(nodes), ", ".join(sorted(nodes.values())))
    gateway = start_gateway(sup, cfg, port)
    return Server(
        cfg=cfg, superlink=child, executor=executor, control=control, gateway=gateway, internal_port=port, lock=lock
    )


def submit(server: Server, spec: RunSpec) -> int:
    """Submit our thin FAB with ``spec`` as run config; return the run id."""
    save_config(spec.config)
    (spec.config.output_dir / EXIT_MARKER).unlink(missing_ok=True)
    app_dir = stage_app(server.private_dir / "app")
    write_spec(spec, server.private_dir / SPEC_FILE)
    run_config = write_run_config(spec, server.private_dir / "run-config.toml")
    run_id = server.control.submit(app_dir, run_config)
    log.info("submitted run %d (rounds %d..%d)", run_id, spec.first_round, spec.config.rounds)
    return run_id


def failure_reason(out_dir: Path, status: RunStatus) -> str:
    """The most useful line explaining a failed run: the ServerApp's last exception, else Flower's details."""
    path = out_dir / LOG_FILE
    if path.is_file():
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
        for line in reversed(lines):
            if _EXCEPTION_LINE.match(line):
                return line[:400]
    return f"{status.outcome} ({status.details})"


def follow(
    server: Server,
    run_id: int,
    on_row: Callable[[RoundRow], None] | None = None,
    watch: Sequence[Child] = (),
    poll: float = 1.0,
) -> RunStatus:
    """Wait for the run to finish, calling ``on_row`` for each new history row as it appears.

    Args:
        server: the running SuperLink.
        run_id: the run to follow.
        on_row: called once per new history row.
        watch: processes that must stay alive (the demo's sites); one exiting fails the run.
        poll: seconds between looks at the history file.

    Raises:
        FedsegError: the SuperLink or a watched process died, or the run failed (the ServerApp's error is quoted).
    """
    out = server.cfg.output_dir
    seen = {r.round for r in read_history(out)}
    last_status = 0.0
    failures = 0
    while True:
        _report_new_rows(out, seen, on_row)
        _check_alive([server.superlink, server.executor, server.gateway, *watch])
        every = STATUS_EVERY_AFTER_EXIT if (out / EXIT_MARKER).is_file() else STATUS_EVERY
        if time.monotonic() - last_status >= every:
            last_status = time.monotonic()
            status, failures = _poll_status(server, run_id, failures)
            if status is not None and status.finished:
                _report_new_rows(out, seen, on_row)
                if not status.succeeded:
                    raise FedsegError(f"run {run_id} failed: {failure_reason(out, status)}")
                return status
        time.sleep(poll)


def _report_new_rows(out: Path, seen: set[int], on_row: Callable[[RoundRow], None] | None) -> None:
    for row in read_history(out):
        if row.round not in seen:
            seen.add(row.round)
            if on_row is not None:
                on_row(row)


def _check_alive(children: Sequence[Child]) -> None:
    for child in children:
        if child.process.poll() is not None:
            tail = child.log_tail(1)[-300:]
            code = child.process.returncode
            raise FedsegError(f"{child.name} exited with code {code}: {tail} (log: {child.log_path})")


def _poll_status(server: Server, run_id: int, failures: int) -> tuple[RunStatus | None, int]:
    """One ``flwr ls``; a failure returns None unless it is the :data:`STATUS_FAILURES`-th in a row (then raises)."""
    try:
        return server.control.status(run_id), 0
    except FedsegError as err:
        if failures + 1 >= STATUS_FAILURES:
            raise
        log.warning("could not get the run status (%s); retrying", err)
        return None, failures + 1


def run_to_end(
    server: Server,
    spec: RunSpec,
    on_row: Callable[[RoundRow], None] | None = None,
    watch: Sequence[Child] = (),
) -> tuple[int, RunStatus]:
    """Submit ``spec`` and follow it; on Ctrl-C ask the SuperLink to stop the run before re-raising."""
    run_id = submit(server, spec)
    try:
        return run_id, follow(server, run_id, on_row, watch)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping run %d", run_id)
        server.control.stop(run_id)
        raise
