"""A one-way event channel between a short-lived app process and the long-running process that watches it.

Flower runs our code in processes we do not own: the ServerApp in ``flwr-serverapp`` (one per run) and the
ClientApp in a new ``flwr-clientapp`` for every message. The processes an operator looks at, ``fed-server
start`` and ``fed-client join``, live longer. The app side appends one JSON object per line to an event file
(:class:`EventWriter`); the watching side reads what was added since its last look (:class:`EventTail`) and turns it
into Prometheus metrics and terminal progress. Events carry aggregate numbers only (rounds, steps, seconds,
bytes, Dice): never a case identifier or anything derived from a patient.

Writing never raises: telemetry must not break a round. Each line is written with one ``write`` call on a file
opened in append mode, so lines from successive processes never interleave.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Event = dict[str, Any]


def process_started() -> float | None:
    """Wall-clock instant this process started (Linux ``/proc``; None elsewhere), to 1/100 s."""
    try:
        stat = Path("/proc/self/stat").read_text(encoding="ascii")
        uptime = float(Path("/proc/uptime").read_text(encoding="ascii").split()[0])
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, counted after the command name
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class EventWriter:
    """Appends events to ``path`` (created with its folder on first use).

    Args:
        path: the event file; ``None`` makes every :meth:`emit` a no-op.
        clock: wall-clock source (seconds since the epoch) stamped into each event as ``t``.
    """

    def __init__(self, path: Path | None, clock: Any = time.time) -> None:
        self.path = path
        self.clock = clock
        self._warned = False

    def emit(self, kind: str, **fields: Any) -> None:
        """Append ``{"t": now, "kind": kind, **fields}`` as one line (a non-finite number as null: JSON has none);
        log (once) and go on when that fails."""
        if self.path is None:
            return
        event = _finite({"t": self.clock(), "kind": kind, **fields})
        line = json.dumps(event, allow_nan=False, default=str) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        except (OSError, ValueError) as err:
            if not self._warned:
                log.warning("cannot write telemetry events to %s: %s", self.path, err)
                self._warned = True


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts and lists too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class EventTail:
    """Reads the complete lines added to an event file since the last :meth:`read`.

    A file that shrank (truncated for a new run) is read again from its start; a partial last line is kept
    for the next call; a line that is not a JSON object is skipped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._partial = b""

    def reset(self) -> None:
        """Empty the file (a new run starts) and read from its start."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"")
        self.offset = 0
        self._partial = b""

    def read(self) -> list[Event]:
        """Events appended since the previous call (``[]`` while the file does not exist)."""
        try:
            size = self.path.stat().st_size
            if size < self.offset:
                self.offset, self._partial = 0, b""
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        events: list[Event] = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "kind" in event:
                events.append(event)
        return events
