"""Watch a run from ``fed-server``: follow the ServerApp's events into metrics, ``/metrics`` and live progress."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry

from fedseg.common.runtime.events import Event, EventTail
from fedseg.common.runtime.exporter import EventPump, MetricsEndpoint
from fedseg.server.config import ServerConfig
from fedseg.server.control.metrics import ServerMetrics
from fedseg.server.run.telemetry import EVENTS_FILE


@contextlib.contextmanager
def monitored(
    cfg: ServerConfig,
    handlers: Sequence[Callable[[Event], None]] = (),
    ticks: Sequence[Callable[[], None]] = (),
    registry: CollectorRegistry | None = None,
) -> Iterator[ServerMetrics]:
    """While the block runs, apply the run's events to fresh :class:`ServerMetrics` and to ``handlers``.

    The event file is emptied first (a new run starts); ``/metrics`` is served when ``cfg.metrics.port`` is set.

    Raises:
        ConfigError: the metrics port cannot be bound.
    """
    registry = registry if registry is not None else CollectorRegistry()
    metrics = ServerMetrics(registry)
    tail = EventTail(cfg.output_dir / EVENTS_FILE)
    tail.reset()
    with (
        MetricsEndpoint(registry, cfg.metrics.host, cfg.metrics.port),
        EventPump(tail, [metrics.apply, *handlers], ticks),
    ):
        yield metrics
