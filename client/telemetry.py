"""A site's telemetry: the ClientApp reports each round's progress, ``fed-client join`` turns it into metrics.

Flower starts a new ``flwr-clientapp`` process for every message, so the ClientApp cannot serve ``/metrics``
itself. It appends events to ``<workdir>/events.jsonl`` (:class:`RoundReporter`, see
:mod:`fedseg.common.runtime.events`); the long-running ``fed-client join`` process reads them and updates
:class:`SiteMetrics` on the registry it was given, adding what only it knows (restarts of the SuperNode,
cases the site check skipped, whether the server answers). Events and metrics hold counts, seconds, losses and
bytes only: no case identifier and nothing derived from a patient.
"""

from __future__ import annotations

import atexit
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedseg.common.runtime.events import Event, EventWriter

#: The event file, relative to the site's workdir.
EVENTS_FILE = Path("events.jsonl")
#: Least seconds between two progress events of one round.
PROGRESS_EVERY = 1.0
SITE_STATES = ("starting", "connecting", "connected", "training", "restarting")
SITE_PHASES = ("load", "train", "round")
PHASE_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))

#: Every metric name this module exports (the Grafana test checks the dashboard against it).
SITE_METRICS = (
    "fedseg_site_info",
    "fedseg_site_round",
    "fedseg_site_steps_done",
    "fedseg_site_steps_planned",
    "fedseg_site_steps_per_second",
    "fedseg_site_loss",
    "fedseg_site_epsilon",
    "fedseg_site_phase_seconds",
    "fedseg_site_rounds_total",
    "fedseg_site_cases_used",
    "fedseg_site_cases_skipped",
    "fedseg_site_supernode_restarts_total",
    "fedseg_site_state",
    "fedseg_site_cuda_peak_memory_bytes",
)


#: The reporter of the latest round in this process (see :func:`note_exit`).
_LATEST: list[RoundReporter] = []


def note_exit(report: RoundReporter) -> None:
    """Emit ``report``'s ``exit`` event when this process exits.

    Flower pushes a ClientApp's reply, then ends its process, so the exit marks the reply leaving the site. A
    long-lived worker (a Ray actor of the simulation runtime) runs many rounds: only its last round is noted.
    """
    if not _LATEST:
        atexit.register(lambda: _LATEST[-1].exiting())
    _LATEST[:] = [report]


class RoundReporter:
    """Used inside the ClientApp for one round: start, throttled step progress, phase times, end.

    Args:
        events: where the events go.
        round_: the global round.
        clock: monotonic clock for throttling and phase times.
    """

    def __init__(self, events: EventWriter, round_: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.events = events
        self.round = round_
        self.clock = clock
        self.started = clock()
        self._first_step: tuple[int, float] | None = None
        self._last_progress = float("-inf")

    def start(self, steps: int, **timing: float | None) -> None:
        """The round's task arrived: ``steps`` local steps are planned.

        ``timing`` adds wall-clock instants of the process's start-up for the round anatomy
        (``process_started``, see :func:`fedseg.common.runtime.events.process_started`); None values are left out.
        """
        marks = {k: v for k, v in timing.items() if v is not None}
        self.events.emit("round_start", round=self.round, steps=steps, **marks)

    def phase(self, name: str, seconds: float) -> None:
        """A phase (``load`` cases, ``train``) took ``seconds``."""
        self.events.emit("phase", round=self.round, phase=name, seconds=seconds)

    def cases(self, used: int) -> None:
        """The round trains on ``used`` cases."""
        self.events.emit("cases", round=self.round, used=used)

    def policy(self, notes: tuple[str, ...] | list[str]) -> None:
        """The site's policy lowered this round's task (``notes``: what changed)."""
        self.events.emit("policy", round=self.round, note="; ".join(notes))

    def step(self, step: int, total: int, loss: float, speed: float) -> None:
        """Step ``step`` of ``total`` done; reported at most once a second (and always the last step).

        Steps per second are measured from the first step on, so model set-up is not counted.
        """
        now = self.clock()
        if step < total and now - self._last_progress < PROGRESS_EVERY:
            return
        self._last_progress = now
        if self._first_step is None:
            self._first_step = (step, now)
        first, since = self._first_step
        rate = (step - first) / (now - since) if now > since else 0.0
        self.events.emit("progress", round=self.round, step=step, steps=total, loss=loss, steps_per_second=rate)

    def run_done(self, last_round: int) -> None:
        """This site replied to the run's last round (``fed-client join`` says so)."""
        self.events.emit("run_done", round=self.round, last_round=last_round)

    def exiting(self) -> None:
        """The ClientApp process exits (its reply was pushed to the SuperNode); see :func:`note_exit`."""
        self.events.emit("exit", round=self.round)

    def end(
        self, ok: bool, loss: float | None = None, epsilon: float | None = None, delta: float | None = None
    ) -> None:
        """The round ended (``ok`` = a reply was sent), with the site's cumulative DP-SGD ε at δ when it trains
        under DP; the peak CUDA memory is reported on a GPU."""
        fields: dict[str, Any] = {"round": self.round, "ok": ok, "seconds": self.clock() - self.started}
        if loss is not None:
            fields["loss"] = loss
        if epsilon is not None and delta is not None:
            fields["epsilon"], fields["delta"] = epsilon, delta
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            fields["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        self.events.emit("round_end", **fields)


class SiteMetrics:
    """The metrics of one ``fed-client join`` process.

    Args:
        registry: where the metrics are registered.
        site: the site's name (the ``fedseg_site_info`` label).
        device: where it trains (the CUDA memory gauge exists unless it is ``cpu``).
    """

    def __init__(self, registry: CollectorRegistry, site: str, device: str) -> None:
        r = registry
        info = Gauge(
            "fedseg_site_info", "Always 1; labels name the site and its device", ["site", "device"], registry=r
        )
        info.labels(site, device).set(1)
        self.round = Gauge("fedseg_site_round", "Round this site trained last (or trains now)", registry=r)
        self.done = Gauge("fedseg_site_steps_done", "Local steps done in the current round", registry=r)
        self.planned = Gauge("fedseg_site_steps_planned", "Local steps planned in the current round", registry=r)
        self.speed = Gauge("fedseg_site_steps_per_second", "Local training steps per second", registry=r)
        self.loss = Gauge("fedseg_site_loss", "Latest local training loss", registry=r)
        self.epsilon = Gauge(
            "fedseg_site_epsilon",
            "This site's cumulative DP-SGD epsilon (at delta) in the federation it trains for; absent without DP",
            ["delta"],
            registry=r,
        )
        self.phase = Histogram(
            "fedseg_site_phase_seconds", "Seconds per round phase", ["phase"], buckets=PHASE_BUCKETS, registry=r
        )
        self.rounds = Counter("fedseg_site_rounds", "Rounds trained, by outcome", ["outcome"], registry=r)
        self.used = Gauge("fedseg_site_cases_used", "Cases the last round trained on", registry=r)
        self.skipped = Gauge("fedseg_site_cases_skipped", "Cases the site check left out", registry=r)
        self.restarts = Counter("fedseg_site_supernode_restarts", "Restarts of the Flower SuperNode", registry=r)
        self.state = Gauge("fedseg_site_state", "1 for the site's current state", ["state"], registry=r)
        self.cuda = (
            Gauge("fedseg_site_cuda_peak_memory_bytes", "Peak CUDA memory of the last round", registry=r)
            if device != "cpu"
            else None
        )
        for outcome in ("completed", "failed"):
            self.rounds.labels(outcome)
        self.current_state = "starting"
        self.set_state("starting")

    def set_state(self, state: str) -> None:
        """Mark ``state`` (of :data:`SITE_STATES`) as current."""
        self.current_state = state
        for name in SITE_STATES:
            self.state.labels(name).set(1 if name == state else 0)

    def apply(self, event: Event) -> None:
        """Update the metrics from one ClientApp event."""
        kind = event["kind"]
        if kind == "round_start":
            self.round.set(event["round"])
            self.planned.set(event["steps"])
            self.done.set(0)
            self.set_state("training")
        elif kind == "cases":
            self.used.set(event["used"])
        elif kind == "progress":
            self.done.set(event["step"])
            if event.get("loss") is not None:
                self.loss.set(event["loss"])
            self.speed.set(event["steps_per_second"])
        elif kind == "phase":
            self.phase.labels(str(event["phase"])).observe(event["seconds"])
        elif kind == "round_end":
            self.rounds.labels("completed" if event["ok"] else "failed").inc()
            self.phase.labels("round").observe(event["seconds"])
            if "epsilon" in event:
                self.epsilon.labels(f"{event['delta']:g}").set(event["epsilon"])
            if "cuda_peak_bytes" in event and self.cuda is not None:
                self.cuda.set(event["cuda_peak_bytes"])
            self.set_state("connected")


def split_address(server: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a (host, port) pair."""
    host, _, port = server.rpartition(":")
    return host.strip("[]"), int(port)


class ConnectionWatch:
    """Whether the server answers: a TCP connect to the SuperLink every ``every`` seconds.

    The SuperNode itself says nothing while it retries, so this is what tells "connecting" from "connected".

    Args:
        server: the SuperLink's ``host:port``.
        metrics: whose state to set (training is left alone).
        on_change: called with the new state whenever it changes.
        every: seconds between probes.
        clock: monotonic clock.
    """

    def __init__(
        self,
        server: str,
        metrics: SiteMetrics,
        on_change: Callable[[str], None] | None = None,
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = split_address(server)
        self.metrics = metrics
        self.on_change = on_change
        self.every = every
        self.clock = clock
        self.state = "starting"
        self._next = float("-inf")

    def probe(self) -> bool:
        """One connect attempt (2 s timeout)."""
        try:
            with socket.create_connection(self.address, timeout=2.0):
                return True
        except OSError:
            return False

    def tick(self) -> None:
        """Probe when due and publish a state change."""
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.every
        if self.metrics.current_state == "training":
            self.set("training")
            return
        self.set("connected" if self.probe() else "connecting")

    def set(self, state: str) -> None:
        """Make ``state`` current (metrics and ``on_change``)."""
        self.metrics.set_state(state)
        if state == self.state:
            return
        self.state = state
        if self.on_change is not None:
            self.on_change(state)
