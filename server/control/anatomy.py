"""Where a round's wall time goes, read from the event files a run already writes (``bench/federation.py --anatomy``).

Sources, all stamped with the same wall clock (one machine):

* the ServerApp's events (:mod:`fedseg.server.run.telemetry`): ``phase`` training (tasks about to be pushed),
  ``reply`` (pulled), ``phase`` aggregating, ``phase`` validating, ``round`` (history row written);
* each site's events (:mod:`fedseg.client.telemetry`): ``launch`` (the gate starts a ClientApp process),
  ``round_start`` (the train handler runs; carries the process start), ``phase`` load / train (seconds),
  ``round_end`` (the handler returns its reply) and ``exit`` (the process exits after Flower pushed the reply).

The critical path of a round is its slowest site (the last reply): send (push until the site's gate launches a
process: SuperNode and gate polling), spawn (launch until the process exists), start-up (process start until the
train handler runs: Python, Flower, torch, MONAI and fedseg imports, pulling the message), load (site cache),
train (local steps), prepare (the rest of the handler: model, weights in and out), push (handler end until the
process exited), forward (until the server pulled the reply: SuperNode, SuperLink, server polling), aggregate,
validate (central Dice, checkpoint, history row) and next (until the next round's tasks are pushed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from fedseg.common.runtime.events import Event

#: Column order of :meth:`RoundAnatomy.phases` (seconds of the slowest site's critical path).
PHASE_COLUMNS = (
    "send",
    "spawn",
    "start-up",
    "load",
    "train",
    "prepare",
    "push",
    "forward",
    "aggregate",
    "validate",
    "next",
)


@dataclass(frozen=True)
class SiteRound:
    """One site's timeline in one round (wall-clock instants; None where an event is missing)."""

    site: str
    launched: float | None = None
    process: float | None = None
    handler: float | None = None
    load: float = 0.0
    train: float = 0.0
    ended: float | None = None
    exited: float | None = None
    replied: float | None = None


@dataclass(frozen=True)
class RoundAnatomy:
    """The phases of one round.

    Attributes:
        round: the global round.
        pushed: when the round's tasks were pushed.
        wall: push of this round until the push of the next (or until its history row, for the last round).
        sites: every site's timeline; :attr:`slowest` is the last to reply.
    """

    round: int
    pushed: float
    wall: float
    aggregate: float
    validate: float
    next: float | None
    sites: Sequence[SiteRound] = field(default_factory=tuple)

    @property
    def slowest(self) -> SiteRound | None:
        """The site whose reply arrived last (None when no site replied)."""
        replied = [s for s in self.sites if s.replied is not None]
        return max(replied, key=lambda s: s.replied or 0.0) if replied else None

    def phases(self) -> dict[str, float | None]:
        """Seconds per :data:`PHASE_COLUMNS` along the slowest site's path (None where unknown)."""
        site = self.slowest or SiteRound("")
        marks = [self.pushed, site.launched, site.process, site.handler]
        steps: list[float | None] = [_gap(a, b) for a, b in pairwise(marks)]
        handler = _gap(site.handler, site.ended)
        prepare = None if handler is None else handler - site.load - site.train
        push, forward = _gap(site.ended, site.exited), _gap(site.exited, site.replied)
        if forward is None:  # no exit mark: the whole way back is one number
            push, forward = None, _gap(site.ended, site.replied)
        values = [*steps, site.load, site.train, prepare, push, forward, self.aggregate, self.validate, self.next]
        return dict(zip(PHASE_COLUMNS, values, strict=True))

    @property
    def overhead(self) -> float:
        """Wall time not spent on the slowest site's local training."""
        site = self.slowest
        return self.wall - (site.train if site is not None else 0.0)


def _gap(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def _first(events: Iterable[Event], kind: str, **match: object) -> Event | None:
    return next((e for e in events if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())), None)


def site_round(site: str, events: Sequence[Event], round_: int, pushed: float, replied: float | None) -> SiteRound:
    """``site``'s timeline in ``round_`` from its events (its gate's first launch after the push counts)."""
    start = _first(events, "round_start", round=round_)
    end = _first(events, "round_end", round=round_)
    exit_ = _first(events, "exit", round=round_)
    launch = next((e for e in events if e["kind"] == "launch" and e["t"] >= pushed), None)
    phases = {e["phase"]: float(e["seconds"]) for e in events if e["kind"] == "phase" and e.get("round") == round_}
    return SiteRound(
        site=site,
        launched=launch["t"] if launch else None,
        process=start.get("process_started") if start else None,
        handler=start["t"] if start else None,
        load=phases.get("load", 0.0),
        train=phases.get("train", 0.0),
        ended=end["t"] if end else None,
        exited=exit_["t"] if exit_ else None,
        replied=replied,
    )


def round_anatomy(server: Sequence[Event], sites: Mapping[str, Sequence[Event]]) -> list[RoundAnatomy]:
    """Every trained round's anatomy from the ServerApp's events and each site's (by site name)."""
    pushes = {e["round"]: e["t"] for e in server if e["kind"] == "phase" and e["phase"] == "training"}
    out = []
    for round_, pushed in sorted(pushes.items()):
        done = _first(server, "round", round=round_)
        aggregating = _first(server, "phase", round=round_, phase="aggregating")
        validating = _first(server, "phase", round=round_, phase="validating")
        if done is None or aggregating is None or validating is None:
            continue  # the round did not finish
        # a reply's own stamp: its "seconds" count from the end of the push, which can take long itself
        replies = {e["site"]: e["t"] for e in server if e["kind"] == "reply" and e["round"] == round_}
        nxt = pushes.get(round_ + 1)
        out.append(
            RoundAnatomy(
                round=round_,
                pushed=pushed,
                wall=(nxt if nxt is not None else done["t"]) - pushed,
                aggregate=validating["t"] - aggregating["t"],
                validate=done["t"] - validating["t"],
                next=None if nxt is None else nxt - done["t"],
                sites=[site_round(name, sites.get(name, ()), round_, pushed, replies[name]) for name in replies],
            )
        )
    return out


def anatomy_table(rounds: Sequence[RoundAnatomy]) -> list[str]:
    """The rounds as text lines: one per round, seconds per phase of the slowest site, then wall and overhead."""
    header = ["round", "slowest", *PHASE_COLUMNS, "wall", "overhead"]
    lines = [" ".join(f"{h:>9}" for h in header)]
    for r in rounds:
        slowest = r.slowest
        cells = [f"{r.round:>9}", f"{(slowest.site if slowest else '-'):>9}"]
        cells += [f"{round(v, 2) + 0.0:>9.2f}" if v is not None else f"{'-':>9}" for v in r.phases().values()]
        cells += [f"{r.wall:>9.2f}", f"{r.overhead:>9.2f}"]
        lines.append(" ".join(cells))
    return lines
