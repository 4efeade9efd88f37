"""The server's executor: Flower's SuperExec, launching ``flwr-serverapp`` so that it dies with us.

``fed-server start`` runs the SuperLink with ``--isolation process`` (it spawns nothing) and this module next to it,
under the same :class:`~fedseg.common.runtime.processes.Supervisor`::

    python -m fedseg.server.control.executor --runtime-api-address 127.0.0.1:PORT --tokens DIR [--root-certificates CA]

Two changes to Flower's own SuperExec, everything else (polling the Runtime API, task bookkeeping) is Flower's:

* every ``flwr-serverapp`` is started with a parent-death signal (SIGKILL): when this executor goes (and it goes
  with ``fed-server``, by the supervisor's own parent-death signal), the ServerApp goes at once, instead of
  retrying a dead SuperLink for tens of seconds as Flower's graceful exit does;
* the task token reaches the process through a file (``--token-file``, mode 0600, removed when the process ends)
  instead of ``--token`` on the command line, where ``ps`` shows it to every local user.

Only ServerApp tasks are taken.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec import run_superexec as superexec
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec
from flwr.supercore.superexec.plugin import AutoExecPlugin

from fedseg.common.runtime.flwrctl import flower_executable
from fedseg.common.runtime.processes import die_with_parent

log = logging.getLogger("fedseg.server.executor")


def write_token(folder: Path, task_id: int, token: str) -> Path:
    """``token`` in a new file only this user can read (the folder is made private too)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    path = folder / f"task-{task_id}.token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(token + "\n")
    return path


def app_argv(spec: ExecutionSpec, token_file: Path) -> list[str]:
    """Command line of ``flwr-serverapp`` for ``spec``: Flower's, with ``--token-file`` instead of ``--token``."""
    argv = [flower_executable("flwr-serverapp"), "--runtime-api-address", spec.runtime_api_address]
    argv += ["--token-file", str(token_file)]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    return argv


class DyingExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except for the parent-death signal and the token file (module docstring)."""

    def __init__(self, tokens: Path) -> None:
        self.tokens = tokens
        self.running: dict[subprocess.Popen[bytes], Path] = {}

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Start ``flwr-serverapp`` for the task; it is killed by the kernel if this process dies."""
        if spec.task_type != TaskType.SERVER_APP:
            return LaunchResult.failed(f"fedseg's server executor runs ServerApp tasks only, not {spec.task_type}")
        token_file = write_token(self.tokens, spec.task_id, spec.token)
        quiet = subprocess.DEVNULL if spec.suppress_output else None
        process = subprocess.Popen(  # called from SuperExec's main loop: the death signal follows the main thread
            app_argv(spec, token_file),
            stdin=subprocess.DEVNULL,
            stdout=quiet,
            stderr=quiet,
            preexec_fn=die_with_parent(),
        )
        self.running[process] = token_file
        log.info("task %d: flwr-serverapp started (pid %d)", spec.task_id, process.pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Collect ended ServerApp processes and remove their token files."""
        for process, token_file in list(self.running.items()):
            if process.poll() is not None:
                token_file.unlink(missing_ok=True)
                del self.running[process]

    def close(self) -> None:
        """Stop what still runs and remove every token file."""
        for process, token_file in self.running.items():
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            token_file.unlink(missing_ok=True)
        self.running.clear()


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

    def executor(*_args: Any, **_kwargs: Any) -> DyingExecutor:
        return DyingExecutor(args.tokens)

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
