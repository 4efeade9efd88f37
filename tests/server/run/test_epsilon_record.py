"""A DP-SGD site's cumulative ε, from its reply to every place the server shows it: history.json, metrics.csv,
the round event, Prometheus, the live table and the HTML report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from prometheus_client import CollectorRegistry
from rich.console import Console

from fedseg.common.fl.offline import train_reply
from fedseg.common.runtime.events import EventTail, EventWriter
from fedseg.server.cli.live import round_table
from fedseg.server.config import ServerConfig
from fedseg.server.control.metrics import ServerMetrics
from fedseg.server.control.report import rounds_table
from fedseg.server.run.history import History, RoundRow
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from fedseg.server.run.telemetry import ServerTelemetry
from tests.server.run.test_rogue_replies import GLOBAL, FakeGrid, honest

pytestmark = pytest.mark.usefixtures("task_identity")


def _metrics(cases: int, epsilon: float | None) -> dict[str, int | float]:
    values: dict[str, int | float] = {
        "num-examples": cases,
        "train-loss": 0.5,
        "train-samples": 8,
        "train-seconds": 1.5,
    }
    return values | ({"epsilon": epsilon, "delta": 1e-5} if epsilon is not None else {})


@pytest.fixture
def dp_row() -> RoundRow:
    """One round with a DP site (ε 2.5) and a site without DP."""
    strategy = RecordingStrategy(build_strategy(ServerConfig(min_sites=2)), 2, 1, 1.0)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))  # type: ignore[arg-type]
    replies = [
        train_reply(1, honest(1), 3, site="private", metrics=_metrics(3, 2.5)),
        train_reply(2, honest(2), 3, site="plain", metrics=_metrics(3, None)),
    ]
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None and not strategy.stats[1].rejected
    return RoundRow(round=1, seconds=2.0, sites=strategy.stats[1].sites, dice={"dice_mean": 0.4})


def test_the_sites_epsilon_is_recorded_in_history_and_metrics_csv(dp_row: RoundRow, tmp_path: Path) -> None:
    by_site = {s.site: s for s in dp_row.sites}
    assert by_site["private"].epsilon == 2.5 and by_site["private"].delta == 1e-5
    assert by_site["plain"].epsilon is None
    History(tmp_path).append(dp_row)
    (saved,) = json.loads((tmp_path / "history.json").read_text())
    assert [(s["site"], s["epsilon"]) for s in saved["sites"]] == [("private", 2.5), ("plain", None)]
    with (tmp_path / "metrics.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["epsilon_private"] == "2.5"
    assert "epsilon_plain" not in row


def test_the_round_event_carries_epsilon_to_prometheus(dp_row: RoundRow, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    ServerTelemetry(EventWriter(events), 1, 1).round_done(dp_row)
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    for event in EventTail(events).read():
        metrics.apply(event)
    assert registry.get_sample_value("fedseg_server_site_epsilon", {"site": "private"}) == 2.5
    assert registry.get_sample_value("fedseg_server_site_epsilon", {"site": "plain"}) is None


def test_the_live_table_and_the_report_show_epsilon(dp_row: RoundRow) -> None:
    console = Console(width=100, record=True)
    console.print(round_table([dp_row]))
    text = console.export_text()
    assert "max ε" in text and "2.500" in text
    console = Console(width=100, record=True)
    console.print(round_table([dp_row.model_copy(update={"sites": [s for s in dp_row.sites if s.site == "plain"]})]))
    assert "ε" not in console.export_text()  # no DP site: no column
    html = rounds_table([dp_row])
    assert "ε 2.50 at δ 1e-05" in html and "loss (cases, s, ε)" in html
