"""Live progress of fed-server: readable at 80 columns, status lines from the ServerApp's events."""

from __future__ import annotations

from rich.console import Console

from fedseg.server.cli.live import RunProgress, round_table
from fedseg.server.run.history import RoundRow, SiteRound

ORGANS = ("pancreas", "spleen", "kidney", "liver", "mean")


def _rows() -> list[RoundRow]:
    site = SiteRound(site="hospital-a", cases=3, loss=0.5, samples=8, seconds=3.0)
    dice = {f"dice_{organ}": 0.5 for organ in ORGANS}
    return [
        RoundRow(round=0, seconds=12.0, dice=dice),
        RoundRow(round=1, seconds=1234.5, sites=[site, site], failures=1, dice=dice, best=True),
    ]


def test_round_table_fits_80_columns_with_full_headers() -> None:
    console = Console(width=80, force_terminal=False, record=True)
    console.print(round_table(_rows()))
    text = console.export_text()
    assert "…" not in text
    header = next(line for line in text.splitlines() if line.lstrip().startswith("round"))
    assert header.split() == ["round", "s", "sites", "loss", *ORGANS, "best"]
    assert "2/3" in text  # two of the three sites asked answered
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80


def test_status_follows_waiting_training_and_replies() -> None:
    now = [100.0]
    progress = RunProgress(clock=lambda: now[0])
    progress.apply({"t": 90.0, "kind": "run", "state": "running", "last_round": 3, "min_sites": 2})
    progress.apply({"t": 90.0, "kind": "phase", "round": 1, "phase": "waiting"})
    assert progress.apply({"t": 95.0, "kind": "sites", "connected": 1, "needed": 2}) == (
        "sites connected: 1 of 2 required"
    )
    assert progress.status() == "waiting for sites: 1 of 2 connected (10 s)"
    progress.apply({"t": 96.0, "kind": "phase", "round": 1, "phase": "training"})
    progress.apply({"t": 96.0, "kind": "sampled", "round": 1, "sites": 2})
    line = progress.apply(
        {"t": 99.0, "kind": "reply", "round": 1, "site": "site-a", "outcome": "ok", "seconds": 3.0, "bytes_in": 1}
    )
    assert line == "round 1: site-a replied (ok) after 3 s, 1/2 done"
    assert progress.status() == "round 1/3 training: 1/2 sites done (site-a), 4 s"
    progress.apply({"t": 100.0, "kind": "phase", "round": 1, "phase": "validating"})
    assert progress.status() == "round 1/3 validating (0 s)"


def test_a_piped_round_line_has_every_organ_not_only_the_mean() -> None:
    from fedseg.server.cli.live import round_line
    from fedseg.server.run.history import RoundRow, SiteRound

    row = RoundRow(
        round=2,
        seconds=3.0,
        sites=[SiteRound(site="a", cases=2, loss=0.5, samples=4, seconds=1.0)],
        dice={"dice_pancreas": 0.1, "dice_liver": 0.7, "dice_mean": 0.4},
    )
    assert round_line(row) == "sites 1/1, loss 0.500, pancreas 0.100, liver 0.700, mean Dice 0.400"
