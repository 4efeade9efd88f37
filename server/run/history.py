"""Per-round history of a federated run: ``history.json`` (one object per round) and ``metrics.csv``.

Both files are rewritten atomically (temporary file + rename) after every round, so a reader (the live
table of ``fed-server``) never sees a half-written file, and a crash leaves the previous round's version.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.csv"


class SiteRound(BaseModel):
    """What one site reported for one round (aggregate numbers only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str
    cases: int = Field(description="training cases the site declared")
    share: float | None = Field(
        default=None, description="the reply's share of the aggregate (its aggregation weight / the round's total)"
    )
    loss: float
    samples: int = Field(description="patches seen")
    seconds: float = Field(description="local training wall time")
    bytes_in: int = Field(default=0, description="payload bytes of the reply")
    update_norm: float | None = Field(default=None, description="‖w_site − w_global‖ of the accepted reply")
    update_cosine: float | None = Field(
        default=None, description="cosine with the round's other updates that half of them reach (None: not checked)"
    )
    screen_loss: float | None = Field(
        default=None, description="its model's loss on the server's screening data (None: not screened)"
    )
    trust: float | None = Field(
        default=None, description="its FLTrust score: cosine with the server's reference update (None: not used)"
    )
    epsilon: float | None = Field(
        default=None, description="the site's cumulative DP-SGD ε after this round, at delta (None: no DP)"
    )
    delta: float | None = Field(default=None, description="the δ of epsilon")


class Rejection(BaseModel):
    """A site reply the server dropped, and why (validation, update-norm bound, site failure, error)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str
    reason: str


class RoundRow(BaseModel):
    """One row of the history: round 0 is the initial model, before any training."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="null")

    round: int = Field(ge=0)
    seconds: float = Field(description="wall time since the previous row (training, aggregation, validation)")
    sites: list[SiteRound] = Field(default_factory=list)
    failures: int = 0
    rejected: list[Rejection] = Field(default_factory=list, description="dropped replies with their reasons")
    dice: dict[str, float | None] = Field(default_factory=dict, description="central validation Dice")
    bytes_out: int = Field(default=0, description="payload bytes sent to sites")
    bytes_in: int = Field(default=0, description="payload bytes received from sites")
    best: bool = Field(default=False, description="this round's model is the best so far")
    cross_site: dict[str, dict[str, dict[str, dict[str, float]]]] = Field(
        default_factory=dict, description="site -> organ -> metric -> mean/sd/n of the sites' own scores"
    )

    @property
    def mean_dice(self) -> float:
        """Mean foreground Dice of the central validation (NaN when not validated)."""
        value = self.dice.get("dice_mean")
        return float("nan") if value is None else float(value)


def clean_dice(dice: dict[str, float]) -> dict[str, float | None]:
    """Dice values with NaN replaced by ``None`` (JSON has no NaN)."""
    return {k: (None if math.isnan(v) else float(v)) for k, v in dice.items()}


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_record(row: RoundRow) -> dict[str, Any]:
    """Flatten a row into CSV columns: totals, Dice per class, then loss/cases/seconds per site."""
    record: dict[str, Any] = {
        "round": row.round,
        "seconds": round(row.seconds, 3),
        "n_sites": len(row.sites),
        "sites": ";".join(s.site for s in row.sites),
        "failures": row.failures,
        "rejected": len(row.rejected),
        "bytes_out": row.bytes_out,
        "bytes_in": row.bytes_in,
        "best": int(row.best),
    }
    for key, value in row.dice.items():
        record[key] = "" if value is None else round(value, 6)
    for site in row.sites:
        record[f"loss_{site.site}"] = round(site.loss, 6)
        record[f"cases_{site.site}"] = site.cases
        if site.share is not None:
            record[f"share_{site.site}"] = round(site.share, 6)
        record[f"train_seconds_{site.site}"] = round(site.seconds, 3)
        if site.update_norm is not None:
            record[f"update_norm_{site.site}"] = round(site.update_norm, 6)
        if site.update_cosine is not None:
            record[f"update_cosine_{site.site}"] = round(site.update_cosine, 6)
        if site.screen_loss is not None:
            record[f"screen_loss_{site.site}"] = round(site.screen_loss, 6)
        if site.trust is not None:
            record[f"trust_{site.site}"] = round(site.trust, 6)
        if site.epsilon is not None:
            record[f"epsilon_{site.site}"] = round(site.epsilon, 6)
    for rejection in row.rejected:
        record[f"rejected_{rejection.site}"] = rejection.reason
    return record


def render_csv(rows: Sequence[RoundRow]) -> str:
    """All rows as CSV text; the header is the union of columns in first-seen order."""
    records = [csv_record(r) for r in rows]
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def read_history(out_dir: Path) -> list[RoundRow]:
    """The rows in ``out_dir/history.json`` ([] when the file does not exist yet)."""
    path = out_dir / HISTORY_FILE
    if not path.is_file():
        return []
    return [RoundRow.model_validate(item) for item in json.loads(path.read_text(encoding="utf-8"))]


class History:
    """The growing history of one output folder.

    Args:
        out_dir: the run's output folder; existing rows are loaded (for ``--resume``).
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.rows: list[RoundRow] = read_history(out_dir)

    def append(self, row: RoundRow) -> None:
        """Add a row (replacing one with the same round number) and rewrite both files."""
        self.rows = [r for r in self.rows if r.round != row.round] + [row]
        self.rows.sort(key=lambda r: r.round)
        self._write()

    def truncate(self, last_round: int) -> None:
        """Drop rows after ``last_round`` (rounds a resumed run will redo) and rewrite the files."""
        kept = [r for r in self.rows if r.round <= last_round]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._write()

    def _write(self) -> None:
        payload = "[\n" + ",\n".join(r.model_dump_json() for r in self.rows) + "\n]\n"
        write_atomic(self.out_dir / HISTORY_FILE, payload)
        write_atomic(self.out_dir / METRICS_FILE, render_csv(self.rows))
