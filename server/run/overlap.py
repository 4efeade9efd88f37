"""Work the next round need not wait for, done in the background one job at a time and in order.

Central validation of round r (Dice on the server's validation set, then the checkpoint and the history row) does
not change what the sites train in round r+1, so with ``validation.overlap`` (the default) the ServerApp hands it
to a :class:`Background` worker and sends round r+1 at once. Jobs run one after another in submission order, so
history rows, checkpoints and ``best.pt`` appear exactly as without overlap, only later. A job that fails fails the
run: its error is raised at the next :meth:`Background.submit` or at :meth:`Background.drain`, which the ServerApp
calls before it reports the run finished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)


class Background:
    """A single worker thread for ordered background jobs (see the module docstring)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedseg-validation")
        self._jobs: list[Future[object]] = []

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job`` after the ones already queued; raise the error of an earlier job that failed."""
        self._raise_failed()
        self._jobs.append(self._pool.submit(job))

    def _raise_failed(self) -> None:
        for done in [j for j in self._jobs if j.done()]:
            self._jobs.remove(done)
            done.result()  # re-raises the job's exception

    def drain(self) -> None:
        """Wait for every queued job; raise the first error. The worker stays usable."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()

    def close(self) -> None:
        """Stop accepting jobs and wait for the running one (queued ones are cancelled)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
