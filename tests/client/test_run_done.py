"""A site says when it has replied to the run's last round, instead of waiting on in silence."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedseg.client.cli.live import SiteProgress
from fedseg.client.policy import PrivacyPolicy
from fedseg.client.telemetry import EVENTS_FILE
from fedseg.common.privacy.config import PrivacyConfig
from fedseg.common.runtime.events import EventTail
from tests.client.test_privacy_handler import _send, _task


def _kinds(workdir: Path) -> list[str]:
    return [e["kind"] for e in EventTail(workdir / EVENTS_FILE).read()]


def test_the_last_rounds_reply_is_marked_and_join_says_so(
    phantom_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = _task(PrivacyConfig()).model_copy(update={"last_round": 2})
    _send(phantom_root, tmp_path / "a", task, PrivacyPolicy(), 1)
    assert "run_done" not in _kinds(tmp_path / "a")  # round 1 of 2: more to come
    _send(phantom_root, tmp_path / "b", task, PrivacyPolicy(), 2)
    (done,) = [e for e in EventTail(tmp_path / "b" / EVENTS_FILE).read() if e["kind"] == "run_done"]
    assert (done["round"], done["last_round"]) == (2, 2)
    view = SiteProgress("site-1", "127.0.0.1:9092")
    view.interactive = False
    with caplog.at_level(logging.INFO):
        view.on_event(done)
    assert "round 2 was the run's last: this site's part is done" in caplog.text


def test_a_task_from_a_server_that_does_not_say_its_last_round_marks_nothing(
    phantom_root: Path, tmp_path: Path
) -> None:
    _send(phantom_root, tmp_path, _task(PrivacyConfig()), PrivacyPolicy(), 5)
    assert "run_done" not in _kinds(tmp_path)
