"""The watching side of the event channel: a thread that applies new events, and the ``/metrics`` HTTP endpoint.

``fed-server start`` and ``fed-client join`` each run one :class:`EventPump` (events -> Prometheus metrics and
live progress) and, when a metrics port is given, one :class:`MetricsEndpoint` serving their own
``CollectorRegistry`` (never prometheus-client's global one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from fedseg.common.errors import ConfigError
from fedseg.common.runtime.events import Event, EventTail

log = logging.getLogger(__name__)

#: Seconds between looks at the event file.
PUMP_EVERY = 0.5


class EventPump:
    """Calls every handler with each new event of ``tail`` (and every tick callback) from a daemon thread.

    Args:
        tail: the event file being followed.
        handlers: called once per event, in order.
        ticks: called after every look at the file (e.g. to refresh elapsed times).
        every: seconds between looks.
    """

    def __init__(
        self,
        tail: EventTail,
        handlers: Sequence[Callable[[Event], None]],
        ticks: Sequence[Callable[[], None]] = (),
        every: float = PUMP_EVERY,
    ) -> None:
        self.tail = tail
        self.handlers = list(handlers)
        self.ticks = list(ticks)
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedseg-events", daemon=True)

    def pump(self) -> int:
        """Apply the events added since the last call; return how many there were."""
        events = self.tail.read()
        for event in events:
            for handler in self.handlers:
                try:
                    handler(event)
                except Exception:  # a malformed event must not stop monitoring
                    log.debug("event %r not applied", event, exc_info=True)
        for tick in self.ticks:
            tick()
        return len(events)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.pump()

    def __enter__(self) -> EventPump:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.pump()  # what arrived since the last look


class MetricsEndpoint:
    """Serves ``registry`` at ``http://host:port/metrics`` while the ``with`` block runs.

    Args:
        registry: the process's own registry.
        host: address to bind (loopback by default: expose it deliberately).
        port: TCP port; None serves nothing.

    Raises:
        ConfigError: the port cannot be bound (on entering the block).
    """

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MetricsEndpoint:
        if self.port is None:
            return self
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as err:
            raise ConfigError(f"cannot serve metrics on {self.host}:{self.port} ({err.strerror or err})") from None
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
