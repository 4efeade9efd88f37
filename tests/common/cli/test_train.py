"""`fed-eval train`: metrics.csv columns and types, the result table in plain 80-column output."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.cli.train import CSV_COLUMNS, render_metrics
from fedseg.common.synthetic.phantoms import generate_phantoms

runner = CliRunner()


def test_metrics_csv_epoch_is_an_integer(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_phantoms(root, sites=1, cases_per_site=1, val_cases=0, size=(16, 32, 32), seed=0)
    out = tmp_path / "run"
    args = ["train", "--data", root / "site-1", "--out", out, "--epochs", "2", "--steps-per-epoch", "1"]
    args += ["--patch", "16,32,32", "--feature-scale", "16", "--batch-size", "1", "--device", "cpu"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    with (out / "metrics.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS == ("epoch", "loss", "seconds", "samples_per_second")
    assert [r["epoch"] for r in rows] == ["1", "2"]  # whole numbers, not 1.0
    assert all(math.isfinite(float(r[key])) for r in rows for key in CSV_COLUMNS[1:])


def test_metrics_table_fits_80_columns_without_cutting(capsys: pytest.CaptureFixture[str]) -> None:
    row = {"epoch": 12, "loss": 0.123456, "seconds": 1234.5, "samples_per_second": 12.345}
    row |= {"dice_pancreas": 0.6361, "dice_spleen": 0.8512, "dice_kidney": 0.8723, "dice_liver": 0.9244}
    row |= {"dice_mean": 0.8210}
    render_metrics([row], Path("runs/a-rather-long-output-folder-name/central"))
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text and "\x1b" not in text
    cells = text.replace("|", " ").split()
    for cell in ("12", "0.1235", "1234", "12.35", "0.636", "0.851", "0.872", "0.924", "0.821"):
        assert cell in cells
    assert "Training in runs/a-rather-long-output-folder-name/central (validation Dice per class)" in " ".join(cells)
    for word in ("epoch", "loss", "s", "samples/s", "pancreas", "spleen", "kidney", "liver", "mean"):
        assert word in text
