"""Rendering of the per-round history: a rich table that grows while the run goes, and a final summary."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from types import TracebackType

from rich.live import Live
from rich.table import Table

from fedseg.common.console import console
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


def round_table(rows: Sequence[RoundRow], title: str = "federated rounds") -> Table:
    """A table with one line per round: time, sites, mean train loss, central Dice per organ, best marker."""
    columns = dice_columns(rows)
    table = Table(title=title, title_justify="left")
    table.add_column("round", justify="right")
    table.add_column("s", justify="right")
    table.add_column("sites", justify="right")
    table.add_column("loss", justify="right")
    for key in columns:
        table.add_column(key.removeprefix("dice_"), justify="right")
    table.add_column("best")
    for row in rows:
        sites = f"{len(row.sites)}" + (f" ({row.failures} failed)" if row.failures else "")
        dice = [_fmt(row.dice.get(k)) for k in columns]
        table.add_row(str(row.round), f"{row.seconds:.1f}", sites, _fmt(mean_loss(row)), *dice, "*" if row.best else "")
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


class LiveRounds:
    """Context manager showing the growing round table; ``add(row)`` is the ``on_row`` callback.

    The table appears with the first row, so a run that fails before any round prints only its error.
    """

    def __init__(self, title: str = "federated rounds") -> None:
        self.rows: list[RoundRow] = []
        self.title = title
        self.live = Live(round_table([], title), console=console, refresh_per_second=2, transient=False)
        self.started = False

    def __enter__(self) -> LiveRounds:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.started:
            self.live.stop()
            console.print()
            self.started = False

    def add(self, row: RoundRow) -> None:
        """Add a row to the table (shown from the first row on) and log it for non-interactive output."""
        self.rows.append(row)
        self.live.update(round_table(self.rows, self.title))
        if not self.started:
            self.live.start()
            self.started = True
        if not console.is_terminal:
            log.info("round %d: %.1f s, mean Dice %s", row.round, row.seconds, _fmt(row.mean_dice))
