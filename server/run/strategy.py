"""Flower strategy selection plus a thin recording wrapper (per-site metrics, bytes, quorum, site wait timeout).

The aggregation itself is Flower's (``flwr.serverapp.strategy``). :class:`RecordingStrategy` delegates every
hook to the chosen strategy and only adds what the federation needs around it:

* it waits at most ``site_wait_timeout`` seconds for ``min_sites`` connected sites (Flower's own wait has no
  timeout) and then fails the run with a clear message;
* it drops malformed replies (wrong keys, missing metrics) instead of letting one bad site abort the round;
* it keeps the previous global model when fewer than ``min_replies`` sites answered;
* it records, per round, each site's name, cases, loss, samples and seconds, and the payload bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from fedseg.common.errors import FedsegError
from fedseg.common.fl.protocol import ARRAYS_KEY, METRIC_KEYS, METRICS_KEY, SITE_KEY, WEIGHT_KEY, Transport
from fedseg.server.config import ServerConfig
from fedseg.server.run.history import SiteRound
from fedseg.server.run.transport import decode_replies, encode_messages

log = logging.getLogger(__name__)


def build_strategy(cfg: ServerConfig) -> FedAvg:
    """The Flower strategy named in ``cfg.strategy`` with our sampling settings (no client-side evaluation).

    ``min_sites`` is both the minimum sample and the minimum number of connected sites; ``fraction`` of the
    connected sites (at least ``min_sites``) train each round.
    """
    common = {
        "fraction_train": cfg.fraction,
        "fraction_evaluate": 0.0,
        "min_train_nodes": cfg.min_sites,
        "min_evaluate_nodes": 0,
        "min_available_nodes": cfg.min_sites,
        "weighted_by_key": WEIGHT_KEY,
        "arrayrecord_key": ARRAYS_KEY,
    }
    s = cfg.strategy
    if s.name == "fedavg":
        return FedAvg(**common)  # type: ignore[arg-type]
    if s.name == "fedprox":
        return FedProx(**common, proximal_mu=s.proximal_mu)  # type: ignore[arg-type]
    adaptive = {"eta": s.server_lr, "eta_l": cfg.train.lr, "beta_1": s.beta_1, "beta_2": s.beta_2, "tau": s.tau}
    if s.name == "fedadam":
        return FedAdam(**common, **adaptive)  # type: ignore[arg-type]
    return FedYogi(**common, **adaptive)  # type: ignore[arg-type]


@dataclass
class RoundStats:
    """What happened in one training round, as seen by the server."""

    sampled: int = 0
    sites: list[SiteRound] = field(default_factory=list)
    failures: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


def site_of(reply: Message) -> str:
    """The site name a reply carries (``node-<id>`` when it carries none)."""
    if not reply.has_content():
        return f"node-{reply.metadata.src_node_id}"
    record = reply.content.config_records.get(SITE_KEY)
    name = record.get("name") if record is not None else None
    return str(name) if name else f"node-{reply.metadata.src_node_id}"


def reply_problem(reply: Message, expected_keys: set[str]) -> str | None:
    """Why a train reply cannot be aggregated, or None when it is usable."""
    if reply.has_error():
        return f"error: {reply.error.reason}"
    content = reply.content
    arrays = content.array_records.get(ARRAYS_KEY)
    metrics = content.metric_records.get(METRICS_KEY)
    if arrays is None or metrics is None or len(content.array_records) != 1 or len(content.metric_records) != 1:
        return f"expected one '{ARRAYS_KEY}' ArrayRecord and one '{METRICS_KEY}' MetricRecord"
    if set(arrays.keys()) != expected_keys:
        return "its weights have different keys than the global model (other model settings?)"
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        return f"its metrics miss {', '.join(missing)}"
    if float(metrics[WEIGHT_KEY]) <= 0:  # type: ignore[arg-type]
        return "it trained on 0 cases"
    return None


def site_round(reply: Message) -> SiteRound:
    """The per-site numbers of a usable reply."""
    metrics = reply.content.metric_records[METRICS_KEY]
    return SiteRound(
        site=site_of(reply),
        cases=int(metrics[WEIGHT_KEY]),  # type: ignore[arg-type]
        loss=float(metrics["train-loss"]),  # type: ignore[arg-type]
        samples=int(metrics["train-samples"]),  # type: ignore[arg-type]
        seconds=float(metrics["train-seconds"]),  # type: ignore[arg-type]
        bytes_in=reply.content.array_records[ARRAYS_KEY].count_bytes(),
    )


def wait_for_sites(grid: Grid, needed: int, timeout: float, poll: float = 1.0) -> int:
    """Wait until ``needed`` sites are connected; return how many are.

    Raises:
        FedsegError: fewer than ``needed`` were connected after ``timeout`` seconds.
    """
    start = time.monotonic()
    announced = -1
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= needed:
            return connected
        if time.monotonic() - start > timeout:
            raise FedsegError(
                f"only {connected} of the {needed} required sites were connected after {timeout:.0f} s; "
                "start more sites with fed-client join or lower min_sites"
            )
        if connected != announced:
            log.info("waiting for sites: %d connected, %d required", connected, needed)
            announced = connected
        time.sleep(poll)


class RecordingStrategy(Strategy):
    """Delegates to ``inner`` and records per-round statistics (see the module docstring).

    Args:
        inner: the Flower strategy that samples and aggregates.
        min_sites: connected sites required before a round starts.
        min_replies: usable replies required to replace the global model.
        site_wait_timeout: seconds to wait for ``min_sites`` before failing the run.
        on_round: optional callback with (server round, stats) after each aggregation.
    """

    def __init__(
        self,
        inner: FedAvg,
        min_sites: int,
        min_replies: int,
        site_wait_timeout: float,
        on_round: Callable[[int, RoundStats], None] | None = None,
    ) -> None:
        self.inner = inner
        self.min_sites = min_sites
        self.min_replies = min_replies
        self.site_wait_timeout = site_wait_timeout
        self.on_round = on_round
        self.stats: dict[int, RoundStats] = {}
        self._keys: set[str] = set()
        self._transport: Transport = "fp32"

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Wait (bounded) for enough sites, then let the inner strategy sample and build the messages."""
        wait_for_sites(grid, self.min_sites, self.site_wait_timeout)
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        messages, self._transport = encode_messages(messages, config)  # fp16/bf16 on the wire when asked
        self._keys = set(arrays.keys())
        sent = messages[0].content.array_records[ARRAYS_KEY].count_bytes() if messages else 0
        self.stats[server_round] = RoundStats(sampled=len(messages), bytes_out=sent * len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Filter unusable replies, record per-site numbers, enforce ``min_replies``, then aggregate."""
        stats = self.stats.setdefault(server_round, RoundStats())
        usable = []
        for reply in replies:
            problem = reply_problem(reply, self._keys)
            if problem is None:
                usable.append(reply)
                stats.sites.append(site_round(reply))
            else:
                log.warning("round %d: ignoring the reply of %s: %s", server_round, site_of(reply), problem)
        stats.bytes_in = sum(s.bytes_in for s in stats.sites)
        stats.failures = max(stats.sampled - len(usable), 0)
        if self.on_round is not None:
            self.on_round(server_round, stats)
        if len(usable) < self.min_replies:
            log.warning(
                "round %d: %d usable replies (< min_replies=%d); keeping the previous global model",
                server_round,
                len(usable),
                self.min_replies,
            )
            return None, None
        return self.inner.aggregate_train(server_round, decode_replies(usable, self._transport))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate (our strategies send no evaluate messages: validation is central)."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate."""
        return self.inner.aggregate_evaluate(server_round, replies)
