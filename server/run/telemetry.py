"""What the ServerApp tells ``fed-server start`` while a run goes: phases, sites, replies, bytes, Dice.

The ServerApp process writes events (see :mod:`fedseg.common.runtime.events`) to ``<output_dir>/.fedseg/
events.jsonl``; ``fed-server start`` turns them into its ``/metrics`` and its live progress. Two small wrappers
produce them without touching Flower's round loop:

* :class:`TelemetryGrid` wraps Flower's ``Grid``: it reports connected sites while the strategy waits for
  ``min_sites``, and replaces ``send_and_receive`` by the same push-then-pull loop so that every reply is
  reported the moment it arrives (site, outcome, bytes, seconds); the replies are pulled one at a time and handed
  on lazily, so the strategy screens each and lets it go before the next is pulled;
* :meth:`ServerTelemetry.timed` wraps the ``evaluate_fn`` to mark the aggregating/validating phases and to
  report each round's Dice and per-site numbers from its history row.

A round goes ``waiting`` (for sites, sampling) -> ``training`` (sites train) -> ``aggregating`` ->
``validating`` (central Dice, checkpoint, history row).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from fedseg.common.fl.packing import is_packed
from fedseg.common.fl.protocol import ARRAYS_KEY, record_of
from fedseg.common.runtime.events import EventWriter
from fedseg.server.run.history import RoundRow
from fedseg.server.run.replies import site_of

#: The event file, relative to the run's output folder.
EVENTS_FILE = Path(".fedseg") / "events.jsonl"
#: Seconds between pulls for replies (Flower's own loop waits 3 s); an idle pull costs the SuperLink ~1 ms.
PULL_EVERY = 0.2
#: Replies asked for per pull: Flower's grid makes every message it pulls at once, so a few at a time keep one round
#: in the ServerApp's memory flat however many sites have replied (the strategy screens each and lets it go).
PULL_BATCH = 1

PHASES = ("waiting", "training", "aggregating", "validating")


def payload_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries (0 for an error or arrays-free message)."""
    if not message.has_content():
        return 0
    return sum(record.count_bytes() for record in message.content.values() if isinstance(record, ArrayRecord))


def reply_outcome(reply: Message, expected_keys: set[str]) -> str:
    """``ok``, ``error`` (the site failed) or ``invalid`` (no weights: neither packed nor with the global model's keys).

    The full validation (shapes, finiteness, metrics, update norms) happens in the strategy; its rejections
    reach the metrics through the round's history row.
    """
    if reply.has_error():
        return "error"
    arrays = record_of(reply.content, ARRAYS_KEY, ArrayRecord)
    return "ok" if arrays is not None and (is_packed(arrays) or set(arrays.keys()) == expected_keys) else "invalid"


#: The per-site numbers a round event carries (what the live view and Prometheus show).
SITE_FIELDS = ("site", "cases", "loss", "seconds", "update_norm", "update_cosine", "epsilon", "delta")


class ServerTelemetry:
    """Emits the ServerApp's events.

    Args:
        events: where events go.
        first_round: global number of this run's first round (resumed runs start later).
        last_round: global number of the run's last round (no wait for a next round after it).
    """

    def __init__(self, events: EventWriter, first_round: int = 1, last_round: int | None = None) -> None:
        self.events = events
        self.last_round = last_round
        self.offset = first_round - 1
        self.round = first_round - 1
        self.phase = ""

    def enter(self, phase: str, round_: int | None = None) -> None:
        """Report that ``phase`` (of :data:`PHASES`) starts, for ``round_`` (default: the round in progress)."""
        self.phase = phase
        self.events.emit("phase", round=self.round + 1 if round_ is None else round_, phase=phase)

    def run_state(self, state: str, **fields: Any) -> None:
        """Report the run's state: ``running``, ``completed`` or ``failed``."""
        self.events.emit("run", state=state, **fields)

    def round_done(self, row: RoundRow) -> None:
        """Report a finished round from its history row (Dice per organ, best, per-site numbers)."""
        data = row.model_dump(mode="json")
        sites = [{k: v for k, v in site.items() if k in SITE_FIELDS} for site in data.get("sites", [])]
        extra = {k: v for k, v in data.items() if k in ("rejected", "rejections")}
        self.events.emit(
            "round",
            round=row.round,
            seconds=row.seconds,
            dice=row.dice,
            best=row.best,
            used=len(row.sites),
            sites=sites,
            **extra,
        )

    def timed(self, evaluate: Callable[[int, ArrayRecord], MetricRecord | None]) -> Callable[..., Any]:
        """Wrap Flower's ``evaluate_fn`` so the validating phase and each round's end are reported."""

        def wrapped(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            global_round = self.offset + server_round
            self.round = global_round
            self.enter("validating", global_round)
            result = evaluate(server_round, arrays)
            if self.last_round is None or global_round < self.last_round:
                self.enter("waiting", global_round + 1)
            return result

        return wrapped


class TelemetryGrid(Grid):
    """A Flower ``Grid`` that delegates to ``inner`` and reports sites, phases and replies to ``telemetry``.

    Args:
        inner: Flower's grid of the ServerApp.
        telemetry: where the reports go.
        min_sites: sites required before a round starts (reported with the connected count).
        clock: monotonic clock (tests pass a fake one).
        sleep: pause between pulls.
    """

    def __init__(
        self,
        inner: Grid,
        telemetry: ServerTelemetry,
        min_sites: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.telemetry = telemetry
        self.min_sites = min_sites
        self.clock = clock
        self.sleep = sleep
        self._connected = -1
        self._names: dict[int, str] = {}

    # Plain delegation ---------------------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids; a change in their number is reported (the wait for ``min_sites`` shows live)."""
        nodes = list(self.inner.get_node_ids())
        if len(nodes) != self._connected:
            self._connected = len(nodes)
            self.telemetry.events.emit("sites", connected=len(nodes), needed=self.min_sites)
        return nodes

    # Replies as they arrive -------------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` now; the replies come as they are pulled (until all arrived or ``timeout`` passed),
        each reported when it arrives. Lazy: a reply is pulled when the strategy asks for the next one."""
        outgoing = list(messages)
        if not outgoing:
            return []
        training = outgoing[0].metadata.message_type == MessageType.TRAIN
        round_ = self.telemetry.round + 1
        if training:
            self.telemetry.enter("training", round_)
            self.telemetry.events.emit("sampled", round=round_, sites=len(outgoing))
        keys = _array_keys(outgoing[0])
        ids = list(self.inner.push_messages(outgoing))
        # message id -> (destination node, bytes sent); an error reply made by the SuperLink has no site as source
        sent = {i: (m.metadata.dst_node_id, payload_bytes(m)) for i, m in zip(ids, outgoing, strict=False)}
        return self._replies(round_ if training else None, ids, sent, keys, timeout)

    def _replies(
        self,
        round_: int | None,
        ids: list[str],
        sent: dict[str, tuple[int, int]],
        keys: set[str],
        timeout: float | None,
    ) -> Iterator[Message]:
        """Pull ``ids`` :data:`PULL_BATCH` at a time every :data:`PULL_EVERY` seconds, yielding each reply (a train
        round, ``round_`` not None, is reported as it goes)."""
        pending = list(ids)
        start = self.clock()
        end = None if timeout is None else start + timeout
        while pending:
            answered: set[str] = set()
            for first in range(0, len(pending), PULL_BATCH):
                arrived = list(self.inner.pull_messages(pending[first : first + PULL_BATCH]))
                while arrived:
                    reply = arrived.pop(0)
                    answered.add(reply.metadata.reply_to_message_id)
                    if round_ is not None:
                        self._report_reply(round_, reply, sent, keys, self.clock() - start)
                    yield reply
                    del reply
            pending = [i for i in pending if i not in answered]
            if not pending or (end is not None and self.clock() >= end):
                break
            self.sleep(PULL_EVERY)
        if round_ is not None:
            self._report_missing(round_, sent, pending)
            self.telemetry.enter("aggregating", round_)

    def _report_reply(
        self, round_: int, reply: Message, sent: dict[str, tuple[int, int]], keys: set[str], seconds: float
    ) -> None:
        node, size = sent.get(reply.metadata.reply_to_message_id, (reply.metadata.src_node_id, 0))
        site = site_of(reply) if reply.has_content() else ""
        if site and not site.startswith("node-"):
            self._names[node] = site
        self.telemetry.events.emit(
            "reply",
            round=round_,
            site=self._names.get(node, f"node-{node}"),
            outcome=reply_outcome(reply, keys),
            bytes_in=payload_bytes(reply),
            bytes_out=size,
            seconds=seconds,
        )

    def _report_missing(self, round_: int, sent: dict[str, tuple[int, int]], pending: list[str]) -> None:
        for message_id in pending:
            node, size = sent[message_id]
            site = self._names.get(node, f"node-{node}")
            self.telemetry.events.emit("missing", round=round_, site=site, bytes_out=size)


def _array_keys(message: Message) -> set[str]:
    record = record_of(message.content, ARRAYS_KEY, ArrayRecord) if message.has_content() else None
    return set(record.keys()) if isinstance(record, ArrayRecord) else set()
