"""The site's executor: Flower's SuperExec with one change, it launches only runs whose app the site trusts.

``fed-client join`` starts the SuperNode with ``--isolation process`` (so the SuperNode itself spawns nothing) and
runs this module next to it: ``python -m fedseg.client.gate --runtime-api-address 127.0.0.1:PORT --trust HASH ...``.
Before a ClientApp process is started for a task, :class:`GatedPlugin` compares the task's FAB hash with the
trusted set; any other run is refused (no process starts, so none of its code runs) and logged with its id.
A trusted app is launched by :class:`~fedseg.common.runtime.appexec.TokenFileExecutor`: ``flwr-clientapp`` dies with
the gate (a parent-death signal) and gets its task token in a private file, not on its command line. Everything else
(polling, task bookkeeping) is Flower's own SuperExec.

Warm start (``--preload MODULE``, what ``fed-client join`` passes unless ``--cold-start``): the gate keeps a
:class:`~fedseg.common.runtime.forkserver.ForkServer` that has imported torch, MONAI and the ClientApp once, and
each ClientApp process is forked from it instead of importing them again for every message.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from flwr.proto.task_pb2 import Task
from flwr.supercore.superexec import run_superexec as superexec
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.plugin import AutoExecPlugin

from fedseg.client.trust import refusal
from fedseg.common.runtime.appexec import TokenFileExecutor
from fedseg.common.runtime.events import EventWriter
from fedseg.common.runtime.forkserver import ForkServer, pidfd_supported

log = logging.getLogger("fedseg.client.gate")

#: Flower's knob for the executor's task poll (its default is 1 s); each poll is one loopback HTTP call.
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
#: Our default: a ClientApp starts within 0.2 s of its message reaching the SuperNode.
POLL_SECONDS = "0.2"
#: What each ClientApp process runs (Flower's ``flwr-clientapp`` main; the fork server imports its module too).
CLIENTAPP_ENTRY = "flwr.supernode.cli:flwr_clientapp"
#: Logged when Flower's SuperExec loop has built its app launcher, and it is ours: proof the gate is in the path.
GATE_ACTIVE = "gate active: Flower's SuperExec launches tasks through fedseg.client.gate.GatedPlugin"


class GatedPlugin(AutoExecPlugin):
    """Flower's app launcher, refusing tasks whose FAB hash is not in :attr:`trusted`."""

    trusted: ClassVar[frozenset[str]] = frozenset()
    refused: ClassVar[set[int]] = set()
    #: The site's event file: a ``launch`` event per started process (the round anatomy's spawn mark).
    events: ClassVar[EventWriter] = EventWriter(None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        log.info("%s; trusted apps: %s", GATE_ACTIVE, ", ".join(sorted(h[:12] for h in self.trusted)))

    def launch_task(self, token: str, task: Task) -> LaunchResult:
        """Launch the task's app process only if its app is trusted."""
        fab_hash = task.fab_hash if task.HasField("fab_hash") else ""
        reason = refusal(int(task.run_id), fab_hash, self.trusted)
        if reason is None:
            self.events.emit("launch", run=int(task.run_id))
            return super().launch_task(token, task)
        if task.run_id not in self.refused:  # Flower may offer the same run again; say it once
            self.refused.add(int(task.run_id))
            log.error("%s (full hash %s)", reason, fab_hash or "none")
        return LaunchResult.failed(reason)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedseg-gate", description="Flower SuperExec that runs only trusted apps.")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (loopback)")
    parser.add_argument("--trust", action="append", default=[], help="a trusted FAB hash (repeat)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process exits")
    parser.add_argument("--tokens", type=Path, help="private folder for task token files (default: a new temp one)")
    parser.add_argument("--events", type=Path, help="the site's event file (a launch event per ClientApp process)")
    parser.add_argument(
        "--preload", action="append", default=[], help="import this module once and fork ClientApps from it (repeat)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the gate process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per task poll otherwise
    args = _parse(argv)
    GatedPlugin.trusted = frozenset(h.lower() for h in args.trust)
    GatedPlugin.events = EventWriter(args.events)
    os.environ.setdefault(POLL_ENV, POLL_SECONDS)  # an operator's own setting wins
    if not hasattr(superexec, "AutoExecPlugin"):
        raise SystemExit("this Flower version has no SuperExec plugin hook; fedseg needs flwr 1.42")
    superexec.AutoExecPlugin = GatedPlugin  # Flower's loop instantiates this name
    tokens = args.tokens if args.tokens is not None else Path(tempfile.mkdtemp(prefix="fedseg-tokens-"))
    preload = list(args.preload)
    if preload and not pidfd_supported():
        log.warning("no pidfd support on this system (Linux 5.3+): ClientApps start from scratch")
        preload = []
    warm = ForkServer(preload, CLIENTAPP_ENTRY) if preload else None  # imports while the SuperNode connects

    def executor(*_args: Any, **_kwargs: Any) -> TokenFileExecutor:
        return TokenFileExecutor(tokens, frozenset(GatedPlugin.supported_task_types), forkserver=warm)

    superexec.get_executor = executor  # type: ignore[attr-defined]  # ... and builds its executor through this one
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=True,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
