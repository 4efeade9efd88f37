"""Rendering of the per-round history: a rich table that grows while the run goes, and a final summary."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from rich.console import Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedseg.common.console import console
from fedseg.common.runtime.events import Event
from fedseg.server.run.history import RoundRow

log = logging.getLogger(__name__)


def dice_columns(rows: Sequence[RoundRow]) -> list[str]:
    """Dice keys in first-seen order, the mean last (e.g. ``dice_pancreas ... dice_mean``)."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(k for k in row.dice if k != "dice_mean"))
    return [*keys, "dice_mean"] if any("dice_mean" in r.dice for r in rows) else list(keys)


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def mean_loss(row: RoundRow) -> float | None:
    """Case-weighted mean training loss of the sites that answered (None in round 0 or without replies)."""
    total = sum(s.cases for s in row.sites)
    if not total:
        return None
    return sum(s.loss * s.cases for s in row.sites) / total


def max_epsilon(row: RoundRow) -> float | None:
    """The largest cumulative DP-SGD ε a site of ``row`` reported (None: no site trains under DP)."""
    values = [s.epsilon for s in row.sites if s.epsilon is not None]
    return max(values) if values else None


def round_line(row: RoundRow) -> str:
    """A round's numbers for a log line: sites, mean train loss, largest ε (under DP), Dice per organ and mean."""
    asked = len(row.sites) + row.failures
    parts = [f"sites {len(row.sites)}/{asked}" if asked else "sites -", f"loss {_fmt(mean_loss(row))}"]
    if (eps := max_epsilon(row)) is not None:
        parts.append(f"max ε {eps:.3f}")
    organs = [k for k in row.dice if k != "dice_mean"]
    parts += [f"{k.removeprefix('dice_')} {_fmt(row.dice.get(k))}" for k in organs]
    parts.append(f"mean Dice {_fmt(row.mean_dice)}")
    return ", ".join(parts)


def round_table(rows: Sequence[RoundRow], title: str = "federated rounds") -> Table:
    """One line per round: time, sites that answered of those asked, mean train loss, the largest site ε (under
    DP-SGD), Dice per organ, best.

    Headers are never shortened: with 4 organs the table is under 80 characters wide, so it stays readable in an
    80-column terminal and in a log file.
    """
    columns = dice_columns(rows)
    private = any(s.epsilon is not None for r in rows for s in r.sites)
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    headers = ["round", "s", "sites", "loss", *(key.removeprefix("dice_") for key in columns), "best"]
    if private:
        headers.insert(4, "max ε")
    for header in headers:
        justify: JustifyMethod = "left" if header == "best" else "right"
        table.add_column(header, justify=justify, no_wrap=True, min_width=len(header))
    for row in rows:
        asked = len(row.sites) + row.failures
        sites = f"{len(row.sites)}/{asked}" if asked else "-"
        cells = [str(row.round), f"{row.seconds:.1f}", sites, _fmt(mean_loss(row))]
        cells += [_fmt(max_epsilon(row))] if private else []
        cells += [_fmt(row.dice.get(k)) for k in columns]
        table.add_row(*cells, "*" if row.best else "")
    return table


def summary_lines(rows: Sequence[RoundRow]) -> list[str]:
    """A few lines summing up a run: rounds, time, best round and its Dice, traffic."""
    if not rows:
        return ["no round was recorded"]
    trained = [r for r in rows if r.round > 0]
    scored = [r for r in rows if not math.isnan(r.mean_dice)]
    lines = [f"{len(trained)} rounds in {sum(r.seconds for r in rows):.0f} s"]
    if scored:
        best = max(scored, key=lambda r: r.mean_dice)
        first, last = scored[0], scored[-1]
        lines.append(
            f"mean Dice {first.mean_dice:.3f} (round {first.round}) -> {last.mean_dice:.3f} (round {last.round}); "
            f"best {best.mean_dice:.3f} in round {best.round}"
        )
    sent = sum(r.bytes_out for r in rows)
    received = sum(r.bytes_in for r in rows)
    lines.append(f"weights sent {sent / 1e6:.1f} MB, received {received / 1e6:.1f} MB")
    return lines


class RunProgress:
    """What the run is doing now, from the ServerApp's events: sites connected, phase, replies of the round.

    Args:
        clock: wall clock (events carry wall-clock stamps ``t``).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.connected = 0
        self.needed = 0
        self.last_round = 0
        self.round = 0
        self.phase = "starting"
        self.since = clock()
        self.sampled = 0
        self.done: list[tuple[str, str, float]] = []

    def apply(self, event: Event) -> str | None:
        """Take one event; return a log line worth printing when output is not a terminal, else None."""
        kind = event["kind"]
        if kind == "run":
            self.last_round = int(event.get("last_round", self.last_round))
            self.needed = int(event.get("min_sites", self.needed))
            return None
        if kind == "sites":
            self.connected, self.needed = int(event["connected"]), int(event["needed"])
            return f"sites connected: {self.connected} of {self.needed} required"
        if kind == "phase":
            self.round, self.phase, self.since = int(event["round"]), str(event["phase"]), float(event["t"])
            if self.phase == "training":
                self.done = []
            return None
        if kind == "sampled":
            self.sampled = int(event["sites"])
            return f"round {self.round}: training on {self.sampled} sites"
        if kind == "reply":
            self.done.append((str(event["site"]), str(event["outcome"]), float(event["seconds"])))
            return (
                f"round {event['round']}: {event['site']} replied ({event['outcome']}) after "
                f"{float(event['seconds']):.0f} s, {len(self.done)}/{self.sampled} done"
            )
        if kind == "missing":
            return f"round {event['round']}: no reply from {event['site']} before the round timeout"
        return None

    def status(self) -> str:
        """One line (< 80 characters for up to a few sites) describing the current phase."""
        elapsed = max(self.clock() - self.since, 0.0)
        of = f"/{self.last_round}" if self.last_round else ""
        if self.phase == "starting":
            return f"starting the ServerApp ({elapsed:.0f} s)"
        if self.phase == "waiting" and self.connected < self.needed:
            return f"waiting for sites: {self.connected} of {self.needed} connected ({elapsed:.0f} s)"
        if self.phase == "training":
            names = " ".join(site for site, _, _ in self.done)
            done = f"{len(self.done)}/{self.sampled} sites done" + (f" ({names})" if names else "")
            return f"round {self.round}{of} training: {done}, {elapsed:.0f} s"
        return f"round {self.round}{of} {self.phase} ({elapsed:.0f} s)"


class LiveRounds:
    """Context manager showing the live status line and the growing round table.

    ``add(row)`` is the ``on_row`` callback; ``on_event`` and ``tick`` follow the ServerApp's events. In a
    terminal the status line and the table refresh in place; otherwise (a log file) each event worth noting
    and each round is logged as one line.
    """

    def __init__(self, title: str = "federated rounds") -> None:
        self.rows: list[RoundRow] = []
        self.title = title
        self.progress = RunProgress()
        self.live = Live(self._render(), console=console, refresh_per_second=2, transient=False)
        self.started = False

    def __enter__(self) -> LiveRounds:
        if console.is_terminal:
            self.live.start()
            self.started = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.started:
            self.live.update(self._render(final=True))
            self.live.stop()
            console.print()
            self.started = False

    def _render(self, final: bool = False) -> RenderableType:
        table = round_table(self.rows, self.title)
        if final:
            return table if self.rows else Text("")
        status = Text(self.progress.status(), style="bold")
        return Group(status, table) if self.rows else status

    def on_event(self, event: Event) -> None:
        """Follow one ServerApp event (called from the event thread)."""
        line = self.progress.apply(event)
        if line is not None and not console.is_terminal:
            log.info("%s", line)

    def tick(self) -> None:
        """Refresh the status line (elapsed times)."""
        if self.started:
            self.live.update(self._render())

    def add(self, row: RoundRow) -> None:
        """Add a row to the table and log it for non-interactive output."""
        self.rows.append(row)
        if self.started:
            self.live.update(self._render())
        if not console.is_terminal:
            log.info("round %d: %.1f s, %s", row.round, row.seconds, round_line(row))
