"""The server's executor: Flower's SuperExec with :class:`~fedseg.common.runtime.appexec.TokenFileExecutor`.

``fed-server start`` runs the SuperLink with ``--isolation process`` (it spawns nothing) and this module next to it,
under the same :class:`~fedseg.common.runtime.processes.Supervisor`::

    python -m fedseg.server.control.executor --runtime-api-address 127.0.0.1:PORT --tokens DIR [--root-certificates CA]

So ``flwr-serverapp`` dies with ``fed-server`` (parent-death signals all the way down) and its task token is never on
a command line. Only ServerApp tasks are taken; everything else (polling, task bookkeeping) is Flower's SuperExec.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec import run_superexec as superexec
from flwr.supercore.superexec.plugin import AutoExecPlugin

from fedseg.common.runtime.appexec import TokenFileExecutor

log = logging.getLogger("fedseg.server.executor")


class ServerAppPlugin(AutoExecPlugin):
    """Flower's task-driven plugin, asking the SuperLink for ServerApp tasks only."""

    supported_task_types: ClassVar[frozenset[TaskType]] = frozenset({TaskType.SERVER_APP})


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedseg-server-executor", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperLink's Runtime API (loopback)")
    parser.add_argument("--root-certificates", help="CA certificate when the SuperLink serves HTTPS")
    parser.add_argument("--tokens", type=Path, required=True, help="private folder for task token files")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the executor process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per task poll otherwise
    args = _parse(argv)
    if not hasattr(superexec, "get_executor"):
        raise SystemExit("this Flower version has no SuperExec executor hook; fedseg needs flwr 1.42")
    if not hasattr(superexec, "AutoExecPlugin"):
        raise SystemExit("this Flower version has no SuperExec plugin hook; fedseg needs flwr 1.42")

    def executor(*_args: Any, **_kwargs: Any) -> TokenFileExecutor:
        return TokenFileExecutor(args.tokens, ServerAppPlugin.supported_task_types)

    superexec.get_executor = executor  # Flower's loop builds its executor and plugin through these names
    superexec.AutoExecPlugin = ServerAppPlugin  # type: ignore[attr-defined]  # re-exported name, not in stubs
    log.info("executor up for %s", args.runtime_api_address)
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.root_certificates is None,
        root_certificates_path=args.root_certificates,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
