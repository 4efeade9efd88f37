"""The event channel: appended lines are read once, partial lines wait, a truncated file is read again."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedseg.common.runtime.events import EventTail, EventWriter


def test_tail_reads_each_complete_line_once(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []  # no file yet
    writer = EventWriter(path, clock=lambda: 5.0)
    writer.emit("round", round=1)
    writer.emit("round", round=2)
    assert tail.read() == [{"t": 5.0, "kind": "round", "round": 1}, {"t": 5.0, "kind": "round", "round": 2}]
    assert tail.read() == []
    with path.open("ab") as handle:
        handle.write(b'{"kind": "half"')
    assert tail.read() == []
    with path.open("ab") as handle:
        handle.write(b', "x": 1}\nnot json\n[1]\n')
    assert tail.read() == [{"kind": "half", "x": 1}]
    tail.reset()
    assert path.read_bytes() == b""
    writer.emit("again")
    assert [e["kind"] for e in tail.read()] == ["again"]


def test_a_file_truncated_by_someone_else_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    tail = EventTail(path)
    writer.emit("a", pad="x" * 50)
    assert len(tail.read()) == 1
    path.write_bytes(b"")
    writer.emit("b")
    assert [e["kind"] for e in tail.read()] == ["b"]


def test_writing_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    EventWriter(blocker / "events.jsonl").emit("x")  # parent is a file: logged, not raised
    EventWriter(None).emit("x")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_started_is_the_child_start_instant() -> None:
    before = time.time()
    code = "from fedseg.common.runtime.events import process_started; print(repr(process_started()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    after = time.time()
    started = float(out)
    # /proc counts in clock ticks (1/100 s): the start lies between the spawn and the answer, within a tick
    assert before - 0.02 <= started <= after
