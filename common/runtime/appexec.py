"""Launching Flower app processes (``flwr-serverapp``, ``flwr-clientapp``) for a SuperExec, two things safer.

Both fedseg executors (the server's :mod:`fedseg.server.control.executor`, the site's :mod:`fedseg.client.gate`) are
Flower's SuperExec with :class:`TokenFileExecutor` in place of Flower's subprocess executor:

* every app process is started with a parent-death signal (SIGKILL): when the executor goes (and it goes with
  ``fed-server`` / ``fed-client join``, by the supervisor's own parent-death signal), the app goes at once, instead
  of retrying a dead SuperLink or SuperNode for tens of seconds as Flower's graceful exit does;
* the task token reaches the process through a file (``--token-file``, mode 0600 in a 0700 folder, removed when the
  process ends) instead of ``--token`` on the command line, where ``ps`` shows it to every local user.

Given a :class:`~fedseg.common.runtime.forkserver.ForkServer`, the executor forks its app processes from that
already-imported process instead of starting them from scratch (the site's warm ClientApp); if the fork server is
unavailable it says so once and starts processes the normal way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec

from fedseg.common.runtime.flwrctl import flower_executable
from fedseg.common.runtime.forkserver import ForkServer, ForkServerError, exited, watch
from fedseg.common.runtime.processes import die_with_parent

log = logging.getLogger(__name__)


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
    """Command line of the app process for ``spec``: Flower's, with ``--token-file`` instead of ``--token``."""
    argv = [flower_executable(TASK_TYPE_TO_COMMAND[spec.task_type]), "--runtime-api-address", spec.runtime_api_address]
    argv += ["--token-file", str(token_file)]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    return argv


class TokenFileExecutor(SubprocessExecutor):
    """Flower's subprocess executor with the parent-death signal and the token file (see the module docstring).

    Args:
        tokens: private folder for the token files.
        task_types: the task types it launches (others fail with a one-line reason).
        forkserver: fork app processes from this preloaded process (None: start each one from scratch).
    """

    def __init__(self, tokens: Path, task_types: frozenset[TaskType], forkserver: ForkServer | None = None) -> None:
        self.tokens = tokens
        self.task_types = task_types
        self.forkserver = forkserver
        self.running: dict[subprocess.Popen[bytes], Path] = {}
        self.forked: dict[int, tuple[int | None, Path]] = {}  # pid -> (pidfd, token file)
        for stale in tokens.glob("task-*.token"):  # left by a killed predecessor (no exit handler ran)
            stale.unlink(missing_ok=True)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Start the task's app process; the kernel kills it if this process dies."""
        if spec.task_type not in self.task_types:
            return LaunchResult.failed(f"this executor does not run {spec.task_type} tasks")
        token_file = write_token(self.tokens, spec.task_id, spec.token)
        argv = app_argv(spec, token_file)
        if self.forkserver is not None and self._fork(argv, spec, token_file):
            return LaunchResult.accepted()
        quiet = subprocess.DEVNULL if spec.suppress_output else None
        process = subprocess.Popen(  # called from SuperExec's main loop: the death signal follows the main thread
            argv,
            stdin=subprocess.DEVNULL,
            stdout=quiet,
            stderr=quiet,
            preexec_fn=die_with_parent(),
        )
        self.running[process] = token_file
        log.info("task %d: %s started (pid %d)", spec.task_id, TASK_TYPE_TO_COMMAND[spec.task_type], process.pid)
        return LaunchResult.accepted()

    def _fork(self, argv: list[str], spec: ExecutionSpec, token_file: Path) -> bool:
        """Fork the app from the fork server; False (after saying why, once) when it cannot."""
        assert self.forkserver is not None
        try:
            pid = self.forkserver.spawn(argv, quiet=spec.suppress_output)
        except ForkServerError as err:
            log.warning("%s; starting app processes from scratch from now on", err)
            self.forkserver.close()
            self.forkserver = None
            return False
        self.forked[pid] = (watch(pid), token_file)
        log.info("task %d: %s forked warm (pid %d)", spec.task_id, TASK_TYPE_TO_COMMAND[spec.task_type], pid)
        return True

    def reconcile(self) -> None:
        """Collect ended app processes and remove their token files."""
        for process, token_file in list(self.running.items()):
            if process.poll() is not None:
                token_file.unlink(missing_ok=True)
                del self.running[process]
        for pid, (pidfd, token_file) in list(self.forked.items()):
            if exited(pidfd):
                _forget(pidfd, token_file)
                del self.forked[pid]

    def close(self) -> None:
        """Stop what still runs and remove every token file."""
        for process, token_file in self.running.items():
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            token_file.unlink(missing_ok=True)
        self.running.clear()
        for pid, (pidfd, token_file) in self.forked.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _forget(pidfd, token_file)
        self.forked.clear()
        if self.forkserver is not None:
            self.forkserver.close()
            self.forkserver = None


def _forget(pidfd: int | None, token_file: Path) -> None:
    if pidfd is not None:
        os.close(pidfd)
    token_file.unlink(missing_ok=True)
