"""``max_seconds`` is a watchdog: the train handler replies by the limit plus the grace even when one step, or the
preprocessing, would run far longer, and the work it gave up stops too."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fedseg.client.training import MAX_GRACE, WORKER_THREAD, Watchdog
from fedseg.common.fl.protocol import FAILURE_KEY, SITE_KEY, policy_note
from tests.client.test_policy import _run_handler, _task

#: What the reply may take beyond the hard stop (building and logging it) on a loaded 2-core machine.
REPLY_SLACK = 1.0


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WORKER_THREAD]


def test_a_step_far_longer_than_max_seconds_is_cut_short_and_the_failure_reply_says_so(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One step of a 128³ patch pair takes seconds even for the tiny network; the limit is half a second.
    task = _task(steps=1000, batch=2).model_copy(
        update={"train": _task(1000, 2).train.model_copy(update={"patch_size": (128, 128, 128)})}
    )
    started = time.monotonic()
    reply, reports = _run_handler(phantom_root, tmp_path, monkeypatch, task, max_seconds=0.5)
    took = time.monotonic() - started
    assert took < 0.5 + Watchdog(0.5, "").grace + REPLY_SLACK, took
    assert reports == []  # the trainer never returned: the step was cut, not waited for
    failure = str(reply.content[SITE_KEY][FAILURE_KEY])
    assert failure.startswith("stopped by the site's time limit (max_seconds 0.5) after ")
    assert failure.endswith(", while training (step 1 of 1000)")
    assert list(reply.content.array_records) == [] and policy_note(reply.content) == ""
    for worker in _workers():  # the abandoned step stops at its next module, not after 1000 steps
        worker.join(timeout=120)
        assert not worker.is_alive()


def test_preprocessing_past_max_seconds_is_cut_short_too(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def stuck(*args: object) -> None:
        release.wait()  # a cache build that would take hours
        raise RuntimeError("abandoned")

    monkeypatch.setattr("fedseg.client.app.load_training_cases", stuck)
    started = time.monotonic()
    reply, _ = _run_handler(phantom_root, tmp_path, monkeypatch, _task(steps=5, batch=2), max_seconds=0.3)
    assert time.monotonic() - started < 0.3 + Watchdog(0.3, "").grace + REPLY_SLACK
    assert str(reply.content[SITE_KEY][FAILURE_KEY]).endswith(", while preparing the cases")
    assert "the work is abandoned" in (tmp_path / "logs" / "clientapp.log").read_text()
    release.set()
    for worker in _workers():
        worker.join(timeout=30)


def test_the_grace_grows_with_the_budget_but_stays_bounded() -> None:
    assert Watchdog(2.0, "").grace == pytest.approx(1.1)
    assert Watchdog(900.0, "").grace == MAX_GRACE == 30.0
