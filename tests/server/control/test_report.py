"""The run report: content from a hand-made history, the CLI, and a real headless Chromium screenshot."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedseg.server.cli.main import app
from fedseg.server.control.report import render_report
from fedseg.server.run.history import History, RoundRow, SiteRound

runner = CliRunner()
MATRIX = {
    "site-a": {"liver": {"dice": {"mean": 0.8, "sd": 0.1, "n": 3.0}, "hd95": {"mean": 4.25, "sd": 1.0, "n": 3.0}}},
    "site-b": {"liver": {"dice": {"n": 0.0}, "hd95": {"n": 0.0}}},
}


def make_run(folder: Path) -> Path:
    """Three rows: round 0, round 1 with both sites, round 2 where site-b failed, with a cross-site matrix."""
    history = History(folder)
    a1, b1 = (
        SiteRound(site="site-a", cases=3, loss=0.9, samples=6, seconds=12.0),
        SiteRound(site="site-b", cases=2, loss=0.7, samples=4, seconds=8.0),
    )
    history.append(RoundRow(round=0, seconds=1.0, dice={"dice_liver": 0.1, "dice_spleen": 0.05, "dice_mean": 0.075}))
    history.append(RoundRow(round=1, seconds=30.0, sites=[a1, b1], dice={"dice_liver": 0.5, "dice_spleen": 0.3}))
    history.append(
        RoundRow(
            round=2,
            seconds=25.0,
            sites=[a1],
            failures=1,
            dice={"dice_liver": 0.7, "dice_spleen": None},
            cross_site=MATRIX,
        )
    )
    (folder / "config.json").write_text(json.dumps({"rounds": 2, "strategy": {"name": "fedavg"}}))
    return folder


def test_report_content(tmp_path: Path) -> None:
    text = render_report(make_run(tmp_path))
    assert "<script" not in text and "http://" not in text and "https://" not in text  # self-contained
    assert text.count("data:image/png;base64,") == 1  # the Dice plot
    assert "0.800 ± 0.100 (n=3)<br>HD95 4.2 mm" in text  # the cross-site cell of site-a
    assert "not annotated / absent" in text  # site-b has no liver cases
    assert text.count("<span class='bad'>absent</span>") == 1  # site-b in round 2 (round 0 trains nobody)
    assert "<span class='bad'>1 / 0</span>" in text
    assert "0.900 (3, 12)" in text  # site-a's loss (cases, seconds)
    assert "&quot;name&quot;: &quot;fedavg&quot;" in text and "torch" in text


def test_report_cli_writes_the_file_and_refuses_a_folder_without_history(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(make_run(tmp_path / "run"))], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "report.html").is_file()
    bad = runner.invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "200"})
    assert bad.exit_code != 0
    assert "error:" in bad.output and "no history.json" in bad.output and "Traceback" not in bad.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install -y chromium)")
def test_report_renders_in_a_real_headless_browser(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    runner.invoke(app, ["report", str(run)])
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    subprocess.run(
        [str(CHROMIUM), *flags, f"--screenshot={shot}", "--window-size=1200,1400", (run / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1400, 1200)
    # The page is not blank: dark text and the plot's coloured lines (matplotlib's blue C0) are drawn.
    assert (pixels.sum(axis=2) < 200).sum() > 1000
    blue = (abs(pixels[..., 0] - 31) < 30) & (abs(pixels[..., 1] - 119) < 30) & (abs(pixels[..., 2] - 180) < 30)
    assert blue.sum() > 50
    copy = Path("/tmp/fedseg-report-screenshot.png")
    shutil.copy(shot, copy)  # kept for a person to look at
