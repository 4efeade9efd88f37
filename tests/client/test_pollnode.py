"""The SuperNode entry point that caps Flower's idle sleeps (fedseg.client.pollnode)."""

from __future__ import annotations

import sys
import time

import pytest
from flwr.supernode import start_client_internal as loop

from fedseg.client import pollnode
from fedseg.client.pollnode import DEFAULT_POLL_SECONDS, POLL_ENV, CappedClock, cap_idle_sleeps, poll_seconds


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, DEFAULT_POLL_SECONDS), ("", DEFAULT_POLL_SECONDS), ("0.2", 0.2), ("0", 0.05), ("60", 3.0), ("x", 0.5)],
)
def test_poll_seconds_reads_the_environment_and_clamps(raw: str | None, expected: float) -> None:
    environ = {} if raw is None else {POLL_ENV: raw}
    assert poll_seconds(environ) == pytest.approx(expected)


def test_capped_clock_shortens_long_sleeps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = CappedClock(0.25)
    clock.sleep(3)  # Flower's idle pull interval
    clock.sleep(0.1)
    assert slept == [0.25, 0.1]
    assert clock.monotonic is time.monotonic  # everything else is the time module's


def test_flowers_supernode_loop_gets_the_capped_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fails when a Flower upgrade drops the loop's module-level ``time``: the cap would silently do nothing.
    monkeypatch.setattr(loop, "time", time)
    assert cap_idle_sleeps(0.2)
    clock = vars(loop)["time"]
    assert isinstance(clock, CappedClock) and clock.cap == 0.2
    assert cap_idle_sleeps(0.4)  # again: the same clock, new cap
    assert vars(loop)["time"] is clock and clock.cap == 0.4


def test_a_changed_flower_loop_is_left_alone_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(loop, "time")
    assert not cap_idle_sleeps(0.2)
    assert not hasattr(loop, "time")
    assert "Flower's own interval" in caplog.text


def test_main_hands_over_to_flower_with_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setenv(POLL_ENV, "0.3")
    monkeypatch.setattr("flwr.supernode.cli.flower_supernode", lambda: called.append("flower"))
    monkeypatch.setattr(sys, "argv", ["/x/pollnode.py", "--insecure"])
    pollnode.main()
    assert called == ["flower"]
    assert sys.argv == ["flower-supernode", "--insecure"]
    clock = vars(loop)["time"]
    assert isinstance(clock, CappedClock) and clock.cap == pytest.approx(0.3)
