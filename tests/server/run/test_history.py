"""history.json / metrics.csv writing, NaN handling, truncation for resumed runs, and the live table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from fedseg.server.cli.live import dice_columns, mean_loss, round_table, summary_lines
from fedseg.server.run.history import History, RoundRow, SiteRound, clean_dice, read_history, render_csv


def _row(number: int, mean: float, sites: tuple[str, ...] = ("a", "b")) -> RoundRow:
    return RoundRow(
        round=number,
        seconds=10.0 + number,
        sites=[SiteRound(site=s, cases=i + 1, loss=0.5 / (i + 1), samples=8, seconds=3.0) for i, s in enumerate(sites)],
        dice=clean_dice({"dice_liver": mean + 0.1, "dice_pancreas": float("nan"), "dice_mean": mean}),
        bytes_out=100,
        bytes_in=90,
        best=number == 2,
    )


def test_append_writes_json_and_csv_that_read_back(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append(_row(1, 0.2))
    history.append(_row(2, 0.4))
    rows = read_history(tmp_path)
    assert [r.round for r in rows] == [1, 2]
    assert rows[1].dice["dice_pancreas"] is None
    assert rows[1].mean_dice == 0.4
    assert json.loads((tmp_path / "history.json").read_text())[0]["sites"][1]["site"] == "b"
    with (tmp_path / "metrics.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert [r["round"] for r in records] == ["1", "2"]
    assert records[0]["dice_pancreas"] == ""
    assert records[1]["dice_mean"] == "0.4"
    assert records[0]["loss_b"] == "0.25"
    assert records[0]["sites"] == "a;b"
    assert records[1]["best"] == "1"


def test_csv_header_is_the_union_of_columns_when_sites_change() -> None:
    text = render_csv([_row(1, 0.2, ("a",)), _row(2, 0.3, ("a", "c"))])
    header, first, second = text.strip().splitlines()
    assert header.split(",")[-3:] == ["loss_c", "cases_c", "train_seconds_c"]
    assert first.endswith(",,,")
    assert second.split(",")[-3:] == ["0.25", "2", "3.0"]


def test_same_round_replaces_and_truncate_drops_later_rounds(tmp_path: Path) -> None:
    history = History(tmp_path)
    for number in (0, 1, 2, 3):
        history.append(_row(number, 0.1 * number))
    history.append(_row(2, 0.9))
    assert [r.mean_dice for r in read_history(tmp_path)] == [0.0, 0.1, 0.9, 0.30000000000000004]
    History(tmp_path).truncate(1)
    assert [r.round for r in read_history(tmp_path)] == [0, 1]


def test_mean_loss_is_case_weighted_and_round_zero_has_none() -> None:
    row = _row(1, 0.2)
    assert mean_loss(row) == (0.5 * 1 + 0.25 * 2) / 3
    assert mean_loss(RoundRow(round=0, seconds=1.0)) is None
    assert math.isnan(RoundRow(round=0, seconds=1.0).mean_dice)


def test_table_and_summary_show_dice_per_organ() -> None:
    rows = [_row(0, 0.1, ()), _row(1, 0.3), _row(2, 0.5)]
    assert dice_columns(rows) == ["dice_liver", "dice_pancreas", "dice_mean"]
    table = round_table(rows)
    assert [c.header for c in table.columns] == ["round", "s", "sites", "loss", "liver", "pancreas", "mean", "best"]
    assert table.row_count == 3
    lines = summary_lines(rows)
    assert lines[0] == "2 rounds in 33 s"
    assert lines[1] == "mean Dice 0.100 (round 0) -> 0.500 (round 2); best 0.500 in round 2"
    assert summary_lines([]) == ["no round was recorded"]
