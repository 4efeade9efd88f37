"""A site's live view in ``fed-client join``: connection state and one progress bar per round.

In a terminal the bars refresh in place; otherwise (a log file) each state change, round start and round end
is one log line, so the log stays readable.
"""

from __future__ import annotations

import logging
from types import TracebackType

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fedseg.common.console import console
from fedseg.common.runtime.events import Event

log = logging.getLogger(__name__)

STATE_TEXT = {
    "starting": "starting the SuperNode",
    "connecting": "connecting to {server} (not yet accepted by the server)",
    "connected": "connected to {server}, waiting for the next round",
    "training": "training",
    "restarting": "SuperNode exited; restarting",
}


def _loss(value: object) -> str:
    """A loss as shown: three decimals, "-" for none (a step that was not finite is written as null)."""
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


class SiteProgress:
    """Progress of one site; ``on_event`` follows the ClientApp's events, ``on_state`` the connection.

    Args:
        site: the site's name.
        server: the SuperLink's ``host:port`` (shown in state lines).
    """

    def __init__(self, site: str, server: str) -> None:
        self.site = site
        self.server = server
        self.interactive = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} st/s"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.interactive,
        )
        self.tasks: dict[int, TaskID] = {}

    def __enter__(self) -> SiteProgress:
        self.progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def _say(self, text: str) -> None:
        if self.interactive:
            self.progress.console.print(f"site [bold]{escape(self.site)}[/]: {escape(text)}")
        else:
            log.info("site %s: %s", self.site, text)

    def on_state(self, state: str) -> None:
        """The connection state changed."""
        if state != "training":
            self._say(STATE_TEXT.get(state, state).format(server=self.server))

    def on_restart(self, restarts: int) -> None:
        """The SuperNode exited and is restarted."""
        self._say(f"SuperNode exited; restart {restarts}")

    def on_event(self, event: Event) -> None:
        """Follow one ClientApp event."""
        kind, round_ = event["kind"], int(event.get("round", 0))
        if kind == "round_start":
            steps = int(event["steps"])
            self.tasks[round_] = self.progress.add_task(f"round {round_}", total=steps, loss="-", rate="-")
            if not self.interactive:
                log.info("site %s: round %d started (%d steps)", self.site, round_, steps)
        elif kind == "progress" and round_ in self.tasks:
            self.progress.update(
                self.tasks[round_],
                completed=int(event["step"]),
                loss=_loss(event.get("loss")),
                rate=f"{float(event['steps_per_second']):.2f}",
            )
        elif kind == "run_done":
            self._say(
                f"round {round_} was the run's last: this site's part is done (the server may still ask it to score "
                "the final model). It stays connected for the server's next run; Ctrl-C to leave."
            )
        elif kind == "policy":
            self._say(f"round {round_}: site policy applied: {event['note']}")
        elif kind == "round_end":
            outcome = "done" if event["ok"] else "FAILED"
            loss = f", loss {_loss(event['loss'])}" if "loss" in event else ""
            if round_ in self.tasks:
                self.progress.stop_task(self.tasks[round_])
            if not self.interactive or not event["ok"]:
                self._say(f"round {round_} {outcome} in {float(event['seconds']):.0f} s{loss}")
