"""`fed-client join`: check and prepare a site's data, then serve it to a federation as a Flower SuperNode."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from prometheus_client import CollectorRegistry
from rich.markup import escape

from fedseg.client.cli.live import SiteProgress
from fedseg.client.policy import site_policy
from fedseg.client.pollnode import DEFAULT_POLL_SECONDS, POLL_RANGE
from fedseg.client.proxy import bypasses, check_proxy, env_proxy
from fedseg.client.site import SiteConfig, resolve_labels
from fedseg.client.supernode import (
    SUPERNODE_LOG,
    JoinOptions,
    SupernodeLog,
    check_and_prepare,
    default_port,
    run_supernode,
)
from fedseg.client.telemetry import EVENTS_FILE, ConnectionWatch, SiteMetrics
from fedseg.client.trust import fedseg_fab_hash, parse_trusted
from fedseg.common.cli.shell import DEFAULT_DEVICE, DEVICE_HELP, guarded
from fedseg.common.console import console
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.device import resolve_device
from fedseg.common.errors import ConfigError
from fedseg.common.runtime.events import EventTail
from fedseg.common.runtime.exporter import EventPump, MetricsEndpoint
from fedseg.common.runtime.processes import is_loopback

log = logging.getLogger(__name__)


class ActivationWatch(ConnectionWatch):
    """A :class:`ConnectionWatch` that says "connected" only once the SuperLink has activated the SuperNode.

    A server that merely answers TCP may still refuse the site (an unlisted key, another CA); until the current
    SuperNode process logged its activation the state stays "connecting".
    """

    def __init__(
        self, server: str, metrics: SiteMetrics, node_log: SupernodeLog, on_change: Callable[[str], None]
    ) -> None:
        super().__init__(server, metrics, on_change=on_change)
        self.node_log = node_log
        self._was_activated = False

    def probe(self) -> bool:
        """Activated, and the server still answers."""
        return self.node_log.activated() and super().probe()

    def tick(self) -> None:
        """Probe at once when the SuperNode has just been activated, otherwise when due."""
        activated = self.node_log.activated()
        if activated and not self._was_activated:
            self._next = float("-inf")
        self._was_activated = activated
        super().tick()


@contextlib.contextmanager
def monitored_site(
    cfg: SiteConfig, server: str, skipped: int, host: str, port: int | None, node_log: SupernodeLog
) -> Iterator[Callable[[int], None]]:
    """Metrics (served on ``host:port`` when a port is given) and live progress while the block runs.

    Yields the callback to give :func:`run_supernode` as ``on_restart``; ``node_log`` tells when it is connected.
    """
    registry = CollectorRegistry()
    metrics = SiteMetrics(registry, cfg.site, str(resolve_device(cfg.device)))  # the device it trains on, not "auto"
    metrics.skipped.set(skipped)
    tail = EventTail(cfg.workdir / EVENTS_FILE)
    tail.reset()
    with SiteProgress(cfg.site, server) as view, MetricsEndpoint(registry, host, port):
        watch = ActivationWatch(server, metrics, node_log, on_change=view.on_state)

        def restarted(count: int) -> None:
            metrics.restarts.inc()
            watch.set("restarting")
            view.on_restart(count)

        with EventPump(tail, [metrics.apply, view.on_event], [watch.tick]):
            yield restarted


def _check_transport(server: str, root_certificates: Path | None, insecure: bool) -> None:
    """Refuse plain HTTP to a server that is not on this machine unless ``--insecure`` says so on purpose: the
    weights and the site's identity would cross the network readable and changeable by anyone on the path."""
    host = server.rpartition(":")[0]
    if root_certificates is None and not insecure and not is_loopback(host):
        raise ConfigError(
            f"--server {server} is not on this machine and --root-certificates is missing: pass the federation's "
            "CA certificate for HTTPS (or --insecure to send the weights in plain HTTP on purpose)"
        )


def _check_server(server: str) -> str:
    if "://" in server or "/" in server:
        raise ConfigError(
            f"--server takes HOST:PORT without a scheme or path (e.g. fed.example.org:9092), got {server!r}; "
            "HTTPS is chosen by --root-certificates"
        )
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--server must look like HOST:PORT (e.g. 10.0.0.5:9092), got {server!r}")
    return server


def _resolve_proxy(server: str, proxy: str | None) -> str | None:
    """The proxy the SuperNode uses: ``--proxy``, else ``HTTPS_PROXY`` unless ``NO_PROXY`` exempts the server."""
    host = server.rpartition(":")[0]
    if proxy is None:
        found = env_proxy()
        if found is None or bypasses(host) or is_loopback(host):
            return None
        proxy = found
    url = check_proxy(proxy)
    log.info("site: reaching %s through the proxy %s (HTTP CONNECT)", server, url)
    console.print(f"reaching [bold]{escape(server)}[/] through the proxy {escape(url)}")
    return url


@guarded
def join_command(
    site: Annotated[str, typer.Option("--site", help="This site's name, as the server will report it.")],
    data: Annotated[Path, typer.Option("--data", help="The site's dataset folder (MSD, nnU-Net or images/+labels/).")],
    server: Annotated[str, typer.Option("--server", help="The SuperLink's HOST:PORT.")] = "127.0.0.1:9092",
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels", help="Label manifest (TOML/JSON) or built-in name (default: DATA/labels.toml, else 1..4)."
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help=f"Where to train: {DEVICE_HELP}")] = DEFAULT_DEVICE,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Private folder for cache and logs (default: ./fedseg-<site>).")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Local port of the SuperNode runtime API (default: a free one).")
    ] = None,
    root_certificates: Annotated[
        Path | None,
        typer.Option("--root-certificates", help="CA certificate for HTTPS (required unless the server is loopback)."),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="Allow plain HTTP to a server on another machine (weights readable on the way)."
        ),
    ] = False,
    auth_key: Annotated[
        Path | None, typer.Option("--auth-key", help="SuperNode private key when the server enforces node auth.")
    ] = None,
    max_restarts: Annotated[
        int | None, typer.Option("--max-restarts", help="Stop after this many SuperNode restarts (default: never).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", min=1, max=65535, help="Serve Prometheus /metrics on this port.")
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address /metrics binds (loopback unless exposed on purpose).")
    ] = "127.0.0.1",
    trust_app: Annotated[
        list[str] | None,
        typer.Option("--trust-app", help="Also run apps with this FAB hash (default: only the installed fedseg app)."),
    ] = None,
    policy_file: Annotated[
        Path | None,
        typer.Option("--policy", help="Site policy TOML capping the server's task (default: DATA/policy.toml if any)."),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="At most this many local steps per round (overrides --policy).")
    ] = None,
    max_seconds: Annotated[
        float | None,
        typer.Option(
            "--max-seconds", help="Seconds per task from its arrival, preprocessing included; the reply goes by then."
        ),
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option("--max-batch", help="At most this many patches per batch (overrides --policy).")
    ] = None,
    cold_start: Annotated[
        bool,
        typer.Option(
            "--cold-start",
            help="Start every ClientApp process from scratch instead of forking it from a process that imported "
            "torch and fedseg once (slower per round; uses ~0.5 GB less memory between rounds).",
        ),
    ] = False,
    poll_seconds: Annotated[
        float,
        typer.Option(
            "--poll-seconds",
            min=POLL_RANGE[0],
            max=POLL_RANGE[1],
            help="Longest wait between the SuperNode's pulls for a task while idle (Flower's own: 3; each pull is "
            "one small request to the server).",
        ),
    ] = DEFAULT_POLL_SECONDS,
    proxy: Annotated[
        str | None,
        typer.Option(
            "--proxy",
            help="Forward proxy to reach the server through (http://HOST:PORT, HTTP CONNECT; TLS stays end to end). "
            "Default: HTTPS_PROXY/https_proxy, unless NO_PROXY names the server.",
        ),
    ] = None,
) -> None:
    """Check the data, preprocess it once, then join the federation (Ctrl-C to leave)."""
    _check_server(server)
    _check_transport(server, root_certificates, insecure)
    via = _resolve_proxy(server, proxy)
    if auth_key is not None and root_certificates is None:
        raise ConfigError("--auth-key needs --root-certificates: node authentication works over HTTPS only")
    trusted = parse_trusted(trust_app or []) | {fedseg_fab_hash()}
    for name, path in (("--root-certificates", root_certificates), ("--auth-key", auth_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{name} {path} does not exist")
    if not data.is_dir():
        raise ConfigError(f"--data {data} is not a folder; pass the site's dataset folder")
    policy = site_policy(
        data, policy_file, {"max_steps": max_steps, "max_seconds": max_seconds, "max_batch": max_batch}
    )
    policy.check_device(device)
    cfg = SiteConfig(
        site=site,
        data=data.resolve(),
        labels=resolve_labels(data, labels),
        workdir=(workdir or Path(f"fedseg-{site}")).resolve(),
        device=device,
        **policy.caps(),
    )
    resolve_device(cfg.device)
    cfg, report, cases = check_and_prepare(cfg, PreprocessConfig())
    console.print(
        f"site [bold]{escape(site)}[/]: {len(report.usable)} usable, {len(report.skipped)} skipped; "
        f"{len(cases)} cases cached in {escape(str(cfg.cache_dir))}"
    )
    opts = JoinOptions(
        server=server,
        port=port if port is not None else default_port(),
        root_certificates=root_certificates.resolve() if root_certificates else None,
        auth_key=auth_key.resolve() if auth_key else None,
        max_restarts=max_restarts,
        trusted_apps=trusted,
        warm=not cold_start,
        poll_seconds=poll_seconds,
        proxy=via,
    )
    limits = policy.model_dump(exclude_none=True, exclude={"devices"})
    if limits:
        console.print(f"site [bold]{escape(site)}[/] policy: " + ", ".join(f"{k} {v}" for k, v in limits.items()))
    console.print(f"site [bold]{escape(site)}[/] runs only these apps (FAB hash): {', '.join(sorted(trusted))}")
    node_log = SupernodeLog(cfg.log_dir / SUPERNODE_LOG)
    try:
        with monitored_site(cfg, opts.server, len(report.skipped), metrics_host, metrics_port, node_log) as restarted:
            run_supernode(cfg, opts, on_restart=restarted, node_log=node_log)
    except KeyboardInterrupt:
        console.print(f"site [bold]{escape(site)}[/] left the federation")
