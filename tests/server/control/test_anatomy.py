"""The round anatomy splits a round along its slowest site's path, from hand-made event timelines."""

from __future__ import annotations

import pytest

from fedseg.common.runtime.events import Event
from fedseg.server.control.anatomy import PHASE_COLUMNS, anatomy_table, round_anatomy


def ev(t: float, kind: str, **fields: object) -> Event:
    return {"t": t, "kind": kind, **fields}


# Round 1 pushed at t=100; site-a's reply is pulled at 120.5, site-b's at 130.5 (the slowest; "seconds" count from
# the end of the push and are not used); aggregation 130.5..131, validation 131..135; round 2 pushed at 136, b's
# reply pulled at 146, done at 150.
SERVER = [
    ev(100.0, "phase", round=1, phase="training"),
    ev(120.5, "reply", round=1, site="site-a", seconds=20.0),
    ev(130.5, "reply", round=1, site="site-b", seconds=30.0),
    ev(130.5, "phase", round=1, phase="aggregating"),
    ev(131.0, "phase", round=1, phase="validating"),
    ev(135.0, "round", round=1, seconds=35.0),
    ev(135.0, "phase", round=2, phase="waiting"),
    ev(136.0, "phase", round=2, phase="training"),
    ev(146.0, "reply", round=2, site="site-b", seconds=10.0),
    ev(146.0, "phase", round=2, phase="aggregating"),
    ev(147.0, "phase", round=2, phase="validating"),
    ev(150.0, "round", round=2, seconds=14.0),
]
SITE_B = [
    ev(99.0, "launch", run=7),  # before the push: not this round's
    ev(103.0, "launch", run=7),
    ev(112.0, "round_start", round=1, steps=5, process_started=103.5),
    ev(113.0, "phase", round=1, phase="load", seconds=1.0),
    ev(128.0, "phase", round=1, phase="train", seconds=15.0),
    ev(128.5, "round_end", round=1, ok=True, seconds=16.5),
    ev(129.5, "exit", round=1),
    ev(137.0, "launch", run=7),
    ev(139.0, "round_start", round=2, steps=5),  # no process start (not Linux), no exit mark
    ev(140.0, "phase", round=2, phase="load", seconds=0.5),
    ev(145.0, "phase", round=2, phase="train", seconds=5.0),
    ev(145.0, "round_end", round=2, ok=True, seconds=6.0),
]


def test_round_split_along_the_slowest_site() -> None:
    first, second = round_anatomy(SERVER, {"site-a": [], "site-b": SITE_B})
    assert first.slowest is not None and first.slowest.site == "site-b"
    assert first.phases() == pytest.approx(
        {
            "send": 3.0,
            "spawn": 0.5,
            "start-up": 8.5,
            "load": 1.0,
            "train": 15.0,
            "prepare": 0.5,
            "push": 1.0,
            "forward": 1.0,
            "aggregate": 0.5,
            "validate": 4.0,
            "next": 1.0,
        }
    )
    assert first.wall == pytest.approx(36.0)
    assert first.overhead == pytest.approx(21.0)
    assert sum(v for v in first.phases().values() if v is not None) == pytest.approx(first.wall)
    phases = second.phases()
    assert phases["send"] == pytest.approx(1.0)
    assert phases["spawn"] is None and phases["start-up"] is None and phases["push"] is None
    assert phases["prepare"] == pytest.approx(0.5) and phases["forward"] == pytest.approx(1.0)
    assert phases["next"] is None and second.wall == pytest.approx(14.0)


def test_unfinished_round_is_left_out_and_table_has_a_line_per_round() -> None:
    unfinished = [*SERVER, ev(151.0, "phase", round=3, phase="training")]
    rounds = round_anatomy(unfinished, {"site-b": SITE_B})
    assert [r.round for r in rounds] == [1, 2]
    lines = anatomy_table(rounds)
    assert len(lines) == 3
    assert lines[0].split() == ["round", "slowest", *PHASE_COLUMNS, "wall", "overhead"]
    assert lines[1].split()[:3] == ["1", "site-b", "3.00"]
    assert lines[2].split()[3:5] == ["-", "-"]
