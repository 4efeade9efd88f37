"""Become a Flower SuperNode for one site: check and prepare the data, then run ``flower-supernode`` in a restart loop.

The SuperNode exits when the SuperLink it knew is gone (an in-memory SuperLink that restarted answers its
heartbeat with HTTP 401), so ``fed-client join`` supervises it: any exit other than our own shutdown restarts
it after a back-off (1 s doubling to 30 s, reset after a minute of healthy running). Ctrl-C or SIGTERM stops
it, and its helpers, cleanly.

A SuperNode the SuperLink *refused* (an unlisted key, another CA, node auth without TLS: Flower ends it with an
``Exit Code: N`` report before the ``SuperNode ID:`` line of a successful activation) is not restarted: a new one
would be refused the same way. :class:`SupernodeLog` reads both from the SuperNode's log, and
:func:`run_supernode` stops with the refusal's reason. Connection errors are retried by the SuperNode itself.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedseg.client.pollnode import DEFAULT_POLL_SECONDS, POLL_ENV
from fedseg.client.proxy import proxy_env
from fedseg.client.site import NODE_CONFIG_FILE, SiteConfig, resolve_labels, write_node_config
from fedseg.client.telemetry import EVENTS_FILE
from fedseg.common.data.layouts import CaseFiles
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sitecache import prepare_site
from fedseg.common.data.sitecheck import SiteReport, check_site
from fedseg.common.errors import DataError, FedsegError
from fedseg.common.runtime.flwrctl import flower_env, flower_executable
from fedseg.common.runtime.processes import Supervisor, free_port

log = logging.getLogger(__name__)

HEALTHY_SECONDS = 60.0
MAX_BACKOFF = 30.0
SUPERNODE_LOG = "supernode.log"
#: What Flower's SuperNode logs once the SuperLink has registered and activated it (``start_client_internal``).
ACTIVATED = "SuperNode ID:"
#: Refusals in a row tolerated once this site has been activated: a SuperLink that restarts in memory lists its
#: sites' keys a moment after it answers. Before the first activation the first refusal is final.
REFUSALS_AFTER_ACTIVATION = 5
#: Flower's exit report (``flwr.supercore.exit.flwr_exit``): ``Exit Code: N``, the reason's lines, a blank line.
_EXIT_REPORT = re.compile(r"Exit Code: (\d+)\n(.*?)(?:\n\s*\n|\Z)", re.DOTALL)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: A hint for some refusals: (text in Flower's reason, lower case; what the site can do).
REFUSAL_HINTS = (
    ("[code: 2004]", "the server does not list this site's key: send site-key.pub to its admin (fed-server sites add)"),
    ("certificate", "--root-certificates must be the CA that signed the server's certificate (fed-server certs)"),
    ("ssl", "the server may speak plain HTTP: check --root-certificates against the server's TLS setting"),
)


class SupernodeRefused(FedsegError):
    """The SuperLink refused this site's SuperNode; restarting it would not help."""


def exit_reason(text: str) -> str | None:
    """Flower's own exit report in a SuperNode's output, on one line (``exit code 305: ...``), or None."""
    match = _EXIT_REPORT.search(_ANSI.sub("", text))
    if match is None:
        return None
    lines = [line.strip() for line in match.group(2).splitlines() if line.strip()]
    return f"Flower exit code {match.group(1)}: {' '.join(lines)}"


def refusal_hint(reason: str) -> str:
    """What the site can do about a refusal ("" when there is no advice)."""
    lowered = reason.lower()
    return next((hint for needle, hint in REFUSAL_HINTS if needle in lowered), "")


class SupernodeLog:
    """The current SuperNode process's part of its (appended) log: activated yet, or refused and why.

    :meth:`begin` marks where the next process's output starts; :meth:`activated` may be called from another
    thread (the connection watch) while the process runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._start = 0
        self._activated = False

    def begin(self) -> None:
        """A new SuperNode process starts writing at the current end of the log."""
        with self._lock:
            self._start = self.path.stat().st_size if self.path.is_file() else 0
            self._activated = False

    def text(self) -> str:
        """What the current process has written so far."""
        with self._lock:
            start = self._start
        if not self.path.is_file():
            return ""
        with self.path.open("rb") as file:
            file.seek(start)
            return _ANSI.sub("", file.read().decode(errors="replace"))

    def activated(self) -> bool:
        """Whether the SuperLink has activated the current process (its ``SuperNode ID:`` line)."""
        if not self._activated and ACTIVATED in self.text():
            with self._lock:
                self._activated = True
        return self._activated

    def refusal(self) -> str | None:
        """Why the SuperLink refused the current process (Flower's exit report before any activation), or None."""
        return None if self.activated() else exit_reason(self.text())


@dataclass(frozen=True)
class JoinOptions:
    """How a site connects.

    Attributes:
        server: the SuperLink's ``host:port``.
        port: local port of the SuperNode's runtime API (distinct per SuperNode on one machine).
        root_certificates: CA certificate for HTTPS; None means plain HTTP (``--insecure``).
        auth_key: SuperNode private key (ECDSA, SSH format) when the SuperLink enforces node auth.
        max_restarts: give up after this many restarts; None restarts forever.
        trusted_apps: FAB hashes whose runs may execute here (the installed fedseg app plus ``--trust-app``).
        warm: fork each ClientApp from a process that imported it once (False: a fresh process per message).
        poll_seconds: longest idle sleep of the SuperNode between pulls (:mod:`fedseg.client.pollnode`; Flower: 3).
        proxy: forward proxy (``http://HOST:PORT``) for the fleet API, as ``HTTPS_PROXY`` (:mod:`fedseg.client.proxy`).
    """

    server: str
    port: int
    root_certificates: Path | None = None
    auth_key: Path | None = None
    max_restarts: int | None = None
    trusted_apps: frozenset[str] = frozenset()
    warm: bool = True
    poll_seconds: float = DEFAULT_POLL_SECONDS
    proxy: str | None = None


#: What the gate's fork server imports once when ``warm``: the ClientApp (torch, MONAI, fedseg), and
#: ``torch._dynamo``, which torch imports lazily when the first optimiser is built (2 s on a quiet 2-core CPU,
#: every round otherwise; measured with cProfile around ``train_locally``).
WARM_MODULES = ("fedseg.client.app", "torch._dynamo")


def usable_view(cases: Sequence[CaseFiles], folder: Path) -> Path:
    """A plain ``images/`` + ``labels/`` folder of symbolic links to the usable cases only.

    Training then never touches a case the site check rejected; the preprocessing cache still keys on the
    resolved original files.
    """
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for case in cases:
        if case.label is None:
            continue
        image_name = case.case_id if case.image.is_dir() else case.case_id + _nifti_suffix(case.image)
        (folder / "images" / image_name).symlink_to(case.image.resolve())
        (folder / "labels" / (case.case_id + _nifti_suffix(case.label))).symlink_to(case.label.resolve())
    return folder


def _nifti_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def check_and_prepare(
    site: SiteConfig, preprocess: PreprocessConfig
) -> tuple[SiteConfig, SiteReport, list[PreparedCase]]:
    """Run the site check, refuse a site without usable cases, then fill the preprocessing cache.

    When the check skipped cases, the returned config points ``data`` at a view of the usable ones
    (``<workdir>/usable``), so the ClientApp trains on exactly what the check accepted.

    Raises:
        DataError: no usable case (the message quotes the first reason).
    """
    report = check_site(site.data, site.manifest())
    for case_id, reason in report.skipped:
        log.warning("skipping case %s: %s", case_id, reason)
    if not report.usable:
        first = f" (first problem: {report.skipped[0][1]})" if report.skipped else ""
        raise DataError(f"site {site.site}: {site.data} has no usable case{first}; fix the data and run again")
    if report.skipped:
        view = usable_view(report.usable, site.workdir / "usable")
        site = site.model_copy(update={"data": view, "labels": resolve_labels(site.data, site.labels)})
    cases = prepare_site(site.data, site.manifest(), preprocess, site.cache_dir)
    log.info("site %s: %d usable cases prepared in %s", site.site, len(cases), site.cache_dir)
    return site, report, cases


def supernode_command() -> list[str]:
    """How to start Flower's SuperNode: through :mod:`fedseg.client.pollnode`, which caps its idle sleeps."""
    flower_executable("flower-supernode")  # a clear error if Flower is missing
    return [sys.executable, "-m", "fedseg.client.pollnode"]


def supernode_argv(opts: JoinOptions, node_config: Path) -> list[str]:
    """Command line of Flower's SuperNode for this site."""
    argv = [
        *supernode_command(),
        "--superlink",
        opts.server,
        "--host",
        "127.0.0.1",
        "--port",
        str(opts.port),
        "--node-config",
        str(node_config),
        "--isolation",
        "process",  # it spawns nothing; fedseg's gate (gate_argv) launches only trusted apps
    ]
    if opts.root_certificates is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(opts.root_certificates)]
    if opts.auth_key is not None:
        argv += ["--auth-supernode-private-key", str(opts.auth_key)]
    return argv


def gate_argv(opts: JoinOptions, tokens: Path | None = None, events: Path | None = None) -> list[str]:
    """Command line of the site's executor (:mod:`fedseg.client.gate`) next to the SuperNode.

    ``tokens`` is the private folder for the ClientApp's task token files (default: a new temporary one);
    ``events`` is the site's event file, where the gate notes each ClientApp process it starts.
    """
    argv = [sys.executable, "-m", "fedseg.client.gate", "--runtime-api-address", f"127.0.0.1:{opts.port}"]
    if tokens is not None:
        argv += ["--tokens", str(tokens)]
    for fab_hash in sorted(opts.trusted_apps):
        argv += ["--trust", fab_hash]
    if events is not None:
        argv += ["--events", str(events)]
    for module in WARM_MODULES if opts.warm else ():
        argv += ["--preload", module]
    return [*argv, "--parent-pid", str(os.getpid())]


def reap_orphans() -> int:
    """Collect every exited child of this process (Flower helpers re-parented to us); return how many.

    ``join`` is a child subreaper (see :class:`~fedseg.common.runtime.processes.Supervisor`), so processes the
    SuperNode or the gate left behind become our children; without this each restart would leave zombies.
    Call it only when no supervised child is running (their exit status belongs to their ``Popen``).
    """
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


def next_backoff(previous: float, ran_for: float) -> float:
    """Seconds to wait before the next restart: doubles up to 30 s, back to 1 s after a healthy minute."""
    if ran_for >= HEALTHY_SECONDS:
        return 1.0
    return min(MAX_BACKOFF, max(1.0, previous * 2))


class RefusalCount:
    """Refusals in a row, and whether one more ends the session (see :data:`REFUSALS_AFTER_ACTIVATION`)."""

    def __init__(self) -> None:
        self.in_a_row = 0
        self.ever_activated = False

    def final(self, node_log: SupernodeLog) -> str | None:
        """Count the SuperNode process that just ended; its refusal's reason when no restart should follow."""
        reason = node_log.refusal()
        self.ever_activated = self.ever_activated or node_log.activated()
        self.in_a_row = self.in_a_row + 1 if reason else 0
        allowed = REFUSALS_AFTER_ACTIVATION if self.ever_activated else 1
        return reason if reason and self.in_a_row >= allowed else None


def refused_error(site: SiteConfig, opts: JoinOptions, reason: str, node_log: SupernodeLog) -> SupernodeRefused:
    """The one-line error for a refused SuperNode: Flower's reason, a hint, and where the full log is."""
    hint = refusal_hint(reason)
    return SupernodeRefused(
        f"site {site.site}: the server at {opts.server} refused this SuperNode ({reason}){'; ' + hint if hint else ''}"
        f"; not restarting it (full output in {node_log.path})"
    )


def run_supernode(
    site: SiteConfig,
    opts: JoinOptions,
    sleep: Callable[[float], None] = time.sleep,
    on_restart: Callable[[int], None] | None = None,
    node_log: SupernodeLog | None = None,
) -> int:
    """Run the SuperNode until interrupted (or ``opts.max_restarts`` is exhausted); return how often it restarted.

    ``on_restart`` is called with the restart count before each restart (telemetry); ``node_log`` follows the
    SuperNode's output (default: a new one on ``<workdir>/logs/supernode.log``).

    Raises:
        KeyboardInterrupt: Ctrl-C or SIGTERM (after the SuperNode has been stopped).
        SupernodeRefused: the SuperLink refused the SuperNode (the message quotes Flower's reason).
    """
    node_config = write_node_config(site, site.workdir / NODE_CONFIG_FILE)
    argv = supernode_argv(opts, node_config)
    env = flower_env(site.workdir / "flwr-home", {POLL_ENV: str(opts.poll_seconds), **proxy_env(opts.proxy)})
    node_log = node_log if node_log is not None else SupernodeLog(site.log_dir / SUPERNODE_LOG)
    refusals = RefusalCount()
    restarts = 0
    backoff = 0.5
    with Supervisor() as sup:
        while True:
            started = time.monotonic()
            node_log.begin()
            child = sup.start("supernode", argv, env=env, log_path=node_log.path)
            gate_cmd = gate_argv(opts, site.workdir / "tokens", site.workdir / EVENTS_FILE)
            gate = sup.start("gate", gate_cmd, env=env, log_path=site.log_dir / "gate.log")
            log.info("site %s: SuperNode (pid %d) connecting to %s", site.site, child.pid, opts.server)
            code = child.process.wait()
            ran_for = time.monotonic() - started
            sup.stop(child)
            sup.stop(gate)
            reap_orphans()
            reason = refusals.final(node_log)
            if reason is not None:
                raise refused_error(site, opts, reason, node_log)
            if opts.max_restarts is not None and restarts >= opts.max_restarts:
                log.error("site %s: SuperNode exited with code %s; no restarts left", site.site, code)
                return restarts
            backoff = next_backoff(backoff, ran_for)
            restarts += 1
            log.warning(
                "site %s: SuperNode exited with code %s after %.0f s; restarting in %.0f s (restart %d)",
                site.site,
                code,
                ran_for,
                backoff,
                restarts,
            )
            if on_restart is not None:
                on_restart(restarts)
            sleep(backoff)


def default_port() -> int:
    """A free local port for the SuperNode's runtime API."""
    return free_port()
