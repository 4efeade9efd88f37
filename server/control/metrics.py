"""The server's Prometheus metrics, built from the ServerApp's events (see :mod:`fedseg.server.run.telemetry`).

Every metric lives on the :class:`~prometheus_client.CollectorRegistry` given to :class:`ServerMetrics`. Labels
are bounded: ``phase``, ``reason``, ``state``, ``organ`` (a class name) and ``site`` (a site's name).
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedseg.common.runtime.events import Event

PHASES = ("waiting", "training", "aggregating", "validating")
RUN_STATES = ("starting", "running", "completed", "failed")
#: Phase lengths from a few seconds (tiny demo) to hours (large sites).
PHASE_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))

#: Every metric name this module exports (the Grafana test checks the dashboard against it).
SERVER_METRICS = (
    "fedseg_server_round",
    "fedseg_server_last_round",
    "fedseg_server_rounds_completed_total",
    "fedseg_server_phase",
    "fedseg_server_phase_seconds",
    "fedseg_server_sites_connected",
    "fedseg_server_sites_required",
    "fedseg_server_sites_sampled",
    "fedseg_server_round_replies",
    "fedseg_server_replies_used_total",
    "fedseg_server_replies_rejected_total",
    "fedseg_server_sent_bytes_total",
    "fedseg_server_received_bytes_total",
    "fedseg_server_site_reply_seconds",
    "fedseg_server_site_loss",
    "fedseg_server_site_train_seconds",
    "fedseg_server_update_norm",
    "fedseg_server_update_cosine",
    "fedseg_server_site_epsilon",
    "fedseg_server_dice",
    "fedseg_server_best_dice",
    "fedseg_server_best_round",
    "fedseg_server_run_state",
)


class ServerMetrics:
    """Gauges, counters and histograms of one ``fed-server`` process, updated by :meth:`apply`.

    Args:
        registry: where the metrics are registered.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.round = Gauge("fedseg_server_round", "Round in progress (0 = scoring the initial model)", registry=r)
        self.last_round = Gauge("fedseg_server_last_round", "Last round of the run", registry=r)
        self.rounds = Counter("fedseg_server_rounds_completed", "Rounds validated and recorded", registry=r)
        self.phase = Gauge("fedseg_server_phase", "1 for the current round phase", ["phase"], registry=r)
        self.phase_seconds = Histogram(
            "fedseg_server_phase_seconds",
            "Time spent in each round phase",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.connected = Gauge("fedseg_server_sites_connected", "Sites connected to the SuperLink", registry=r)
        self.required = Gauge("fedseg_server_sites_required", "Sites required to start a round (min_sites)", registry=r)
        self.sampled = Gauge("fedseg_server_sites_sampled", "Sites sampled in the current round", registry=r)
        self.replies = Gauge("fedseg_server_round_replies", "Replies received in the current round", registry=r)
        self.used = Counter("fedseg_server_replies_used", "Site replies aggregated", registry=r)
        self.rejected = Counter(
            "fedseg_server_replies_rejected", "Site replies not aggregated, by reason", ["reason"], registry=r
        )
        self.sent = Counter("fedseg_server_sent_bytes", "Model bytes sent to each site", ["site"], registry=r)
        self.received = Counter(
            "fedseg_server_received_bytes", "Model bytes received from each site", ["site"], registry=r
        )
        self.reply_seconds = Gauge(
            "fedseg_server_site_reply_seconds",
            "Seconds from sending the task to the site's reply",
            ["site"],
            registry=r,
        )
        self.loss = Gauge("fedseg_server_site_loss", "Mean training loss a site reported", ["site"], registry=r)
        self.train_seconds = Gauge(
            "fedseg_server_site_train_seconds", "Local training seconds a site reported", ["site"], registry=r
        )
        self.norm = Gauge("fedseg_server_update_norm", "L2 norm of a site's update", ["site"], registry=r)
        self.cosine = Gauge(
            "fedseg_server_update_cosine",
            "Direction agreement of a site's update (the direction check)",
            ["site"],
            registry=r,
        )
        self.epsilon = Gauge(
            "fedseg_server_site_epsilon",
            "A site's cumulative DP-SGD epsilon (at its delta) as its latest accepted reply reports it",
            ["site"],
            registry=r,
        )
        self.dice = Gauge("fedseg_server_dice", "Central validation Dice of the latest round", ["organ"], registry=r)
        self.best = Gauge("fedseg_server_best_dice", "Best mean central Dice so far", registry=r)
        self.best_round = Gauge("fedseg_server_best_round", "Round of the best mean central Dice", registry=r)
        self.state = Gauge("fedseg_server_run_state", "1 for the run's current state", ["state"], registry=r)
        for phase in PHASES:
            self.phase.labels(phase).set(0)
        self.set_state("starting")
        self._phase: tuple[str, float] | None = None
        self._best = float("-inf")

    def set_state(self, state: str) -> None:
        """Mark ``state`` as the run's state (the others 0)."""
        for name in RUN_STATES:
            self.state.labels(name).set(1 if name == state else 0)

    def apply(self, event: Event) -> None:
        """Update the metrics from one ServerApp event."""
        handler = getattr(self, f"_on_{event['kind']}", None)
        if handler is not None:
            handler(event)

    def _on_run(self, e: Event) -> None:
        self.set_state(str(e["state"]))
        if "last_round" in e:
            self.last_round.set(e["last_round"])
        if "min_sites" in e:
            self.required.set(e["min_sites"])
        if e["state"] in ("completed", "failed"):
            self._close_phase(float(e["t"]))
            for phase in PHASES:
                self.phase.labels(phase).set(0)

    def _on_phase(self, e: Event) -> None:
        phase, t = str(e["phase"]), float(e["t"])
        self._close_phase(t)
        self._phase = (phase, t)
        for name in PHASES:
            self.phase.labels(name).set(1 if name == phase else 0)
        self.round.set(e["round"])
        if phase == "training":
            self.replies.set(0)

    def _close_phase(self, t: float) -> None:
        if self._phase is not None:
            name, since = self._phase
            self.phase_seconds.labels(name).observe(max(t - since, 0.0))
            self._phase = None

    def _on_sites(self, e: Event) -> None:
        self.connected.set(e["connected"])
        self.required.set(e["needed"])

    def _on_sampled(self, e: Event) -> None:
        self.sampled.set(e["sites"])
        self.replies.set(0)

    def _on_reply(self, e: Event) -> None:
        site = str(e["site"])
        self.replies.inc()
        self.sent.labels(site).inc(e.get("bytes_out", 0))
        self.received.labels(site).inc(e.get("bytes_in", 0))
        self.reply_seconds.labels(site).set(e.get("seconds", 0.0))
        if e["outcome"] != "ok":
            self.rejected.labels(str(e["outcome"])).inc()

    def _on_missing(self, e: Event) -> None:
        self.sent.labels(str(e["site"])).inc(e.get("bytes_out", 0))
        self.rejected.labels("timeout").inc()

    def _on_round(self, e: Event) -> None:
        self.rounds.inc()
        self.used.inc(e.get("used", 0))
        for reason, count in _rejections(e).items():
            self.rejected.labels(reason).inc(count)
        for site in e.get("sites", []):
            name = str(site["site"])
            if site.get("loss") is not None:
                self.loss.labels(name).set(site["loss"])
            self.train_seconds.labels(name).set(site["seconds"])
            if site.get("update_norm") is not None:
                self.norm.labels(name).set(site["update_norm"])
            if site.get("update_cosine") is not None:
                self.cosine.labels(name).set(site["update_cosine"])
            if site.get("epsilon") is not None:
                self.epsilon.labels(name).set(site["epsilon"])
        dice: dict[str, Any] = e.get("dice", {})
        for key, value in dice.items():
            if value is not None:
                self.dice.labels(key.removeprefix("dice_")).set(value)
        mean = dice.get("dice_mean")
        if mean is not None and mean > self._best:
            self._best = float(mean)
            self.best.set(mean)
            self.best_round.set(e["round"])


_REASON = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def reason_label(reason: str) -> str:
    """A bounded label value: short snake_case reasons pass, anything else is ``other``."""
    return reason if _REASON.match(reason) else "other"


def _rejections(e: Event) -> dict[str, int]:
    """Replies the aggregation itself rejected (robust aggregation), as ``{reason: count}``.

    Accepts a ``rejected`` mapping of reason -> count, or a ``rejections`` list of ``{"reason": ...}`` items.
    """
    found: dict[str, int] = {}
    rejected = e.get("rejected")
    if isinstance(rejected, dict):
        found.update({reason_label(str(k)): int(v) for k, v in rejected.items() if isinstance(v, int | float)})
    for item in e.get("rejections", []) if isinstance(e.get("rejections"), list) else []:
        if isinstance(item, dict) and "reason" in item:
            reason = reason_label(str(item["reason"]))
            found[reason] = found.get(reason, 0) + 1
    return found
