"""Flower's ``flower-supernode``, with its idle sleeps capped (``python -m fedseg.client.pollnode ARGS``).

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed 3 s after every pull that
finds no message, and 0.5 s between looks for the ClientApp's reply and for its content. A round's task therefore
reaches a site 1.5 s late on average (0-3 s), which was most of what a round spends outside training on loopback
(README, *Round anatomy*). This entry point runs Flower's own SuperNode command unchanged, except that the loop's
``time.sleep`` waits at most :data:`POLL_ENV` seconds (default :data:`DEFAULT_POLL_SECONDS`; 3 gives Flower's
behaviour). Each idle SuperNode then asks the SuperLink for work ``1 / cap`` times a second, a small request.

If a Flower release no longer has the loop's ``time`` to cap, the SuperNode runs with Flower's own sleeps and a
warning says so: slower rounds, nothing else.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

POLL_ENV = "FEDSEG_SUPERNODE_POLL"
DEFAULT_POLL_SECONDS = 0.5
#: Flower 1.42's own sleep after a pull that found no task.
FLOWER_POLL_SECONDS = 3.0
#: Bounds of the cap: below, an idle site floods the SuperLink with pulls; above, Flower's own sleep is shorter.
POLL_RANGE = (0.05, FLOWER_POLL_SECONDS)


class CappedClock:
    """The ``time`` module as Flower's SuperNode loop sees it: ``sleep`` waits at most ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_idle_sleeps(cap: float) -> bool:
    """Make the SuperNode loop of this process sleep at most ``cap`` seconds; False if Flower's loop has changed."""
    from flwr.supernode import start_client_internal as loop

    current = vars(loop).get("time")
    if isinstance(current, CappedClock):
        current.cap = cap
        return True
    if current is not time:
        log.warning("this Flower has no SuperNode loop clock to cap; polling at Flower's own interval")
        return False
    vars(loop)["time"] = CappedClock(cap)
    return True


def poll_seconds(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """The cap from :data:`POLL_ENV`, clamped to :data:`POLL_RANGE` (the default if unset or not a number)."""
    raw = environ.get(POLL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_POLL_SECONDS
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %.2f", POLL_ENV, raw, DEFAULT_POLL_SECONDS)
        value = DEFAULT_POLL_SECONDS
    return min(max(value, POLL_RANGE[0]), POLL_RANGE[1])


def main() -> None:
    """Cap the loop's sleeps, then hand over to Flower's ``flower-supernode`` with this process's arguments."""
    cap_idle_sleeps(poll_seconds())
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
