"""A fork server: one process imports the heavy modules once, then forks a ready child per app launch.

Flower starts a fresh ``flwr-clientapp`` process for every message a site receives, and each one imports torch,
MONAI and fedseg again before it can pull its message: seconds on a quiet machine, tens of seconds on a loaded one
(the round anatomy, ``bench/federation.py --anatomy``). A :class:`ForkServer` starts
``python -m fedseg.common.runtime.forkserver --preload MODULE ...`` once; that process imports the modules and
then, for each request, forks. The child already has everything imported, sets ``sys.argv`` and runs the entry
point (e.g. Flower's ``flwr-clientapp`` main) exactly as a new process would.

Safety of the fork: the server process never starts a thread or runs a torch operation (only imports), so the
child inherits no lock held by another thread and no initialised OpenMP pool. It checks this before each fork and
refuses (the caller falls back to a normal process start) if a thread has appeared.

Process hygiene: the server dies with its parent (parent-death signal), each child with the server; children are
reaped by the kernel (``SIGCHLD`` ignored in the server), and the parent watches each child through a pidfd, so a
recycled pid is never mistaken for a running app. Requests and replies are JSON lines on the server's stdin and
stdout; the children's own output goes to the server's stderr (or nowhere, when asked to be quiet).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import IO

from fedseg.common.runtime.processes import die_with_parent

log = logging.getLogger(__name__)

_READY = "ready"


class ForkServerError(RuntimeError):
    """The fork server is not available (it failed to start or died); start the app the normal way."""


class ForkServer:
    """The parent's handle on a fork server process.

    Args:
        preload: modules the server imports once (e.g. ``fedseg.client.app``), besides the entry's own module.
        entry: ``module:function`` each child runs with the requested ``sys.argv``; its return value (or
            ``SystemExit`` code) is the child's exit status.
        ready_timeout: seconds :meth:`spawn` waits for the imports to finish on first use.
    """

    def __init__(self, preload: Sequence[str], entry: str, ready_timeout: float = 300.0) -> None:
        self.entry = entry
        self.ready_timeout = ready_timeout
        self.ready = False
        argv = [sys.executable, "-m", __name__, "--entry", entry]
        for module in preload:
            argv += ["--preload", module]
        self.process = subprocess.Popen(  # started from the caller's main thread: the death signal follows it
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent(),
        )
        log.info("fork server started (pid %d), importing %s", self.process.pid, ", ".join(preload))

    def _line(self, timeout: float) -> dict[str, object]:
        stdout = self.process.stdout
        assert stdout is not None
        readable, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if readable else ""
        if not line:
            reason = "timed out" if not readable else f"exited with {self.process.poll()}"
            raise ForkServerError(f"fork server {reason}")
        return dict(json.loads(line))

    def spawn(self, argv: Sequence[str], quiet: bool = False) -> int:
        """Fork a child running the entry point with ``argv``; returns its pid.

        Raises:
            ForkServerError: the server is gone, refused, or did not become ready in time.
        """
        stdin = self.process.stdin
        assert stdin is not None
        try:
            if not self.ready:
                reply = self._line(self.ready_timeout)
                if reply.get("status") != _READY:
                    raise ForkServerError(f"fork server failed to start: {reply.get('error', reply)}")
                self.ready = True
            stdin.write(json.dumps({"argv": list(argv), "quiet": quiet}) + "\n")
            stdin.flush()
            reply = self._line(60.0)
        except (OSError, ValueError) as err:
            raise ForkServerError(f"fork server unreachable ({err})") from None
        pid = reply.get("pid")
        if not isinstance(pid, int):
            raise ForkServerError(f"fork server refused: {reply.get('error', reply)}")
        return pid

    def close(self) -> None:
        """Stop the server (its children get their parent-death signal)."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def pidfd_supported() -> bool:
    """Whether this system can watch a process through a pidfd (Linux 5.3+), which :func:`watch` needs."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def watch(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it has exited), or None when it has already gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def exited(pidfd: int | None) -> bool:
    """Whether the process behind ``pidfd`` (from :func:`watch`) has ended."""
    if pidfd is None:
        return True
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


def _run_child(entry: str, argv: list[str], quiet: bool, replies: int) -> None:
    """In the forked child: detach from the request pipes, run the entry point, exit with its status."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        setup = die_with_parent()
        if setup is not None:
            setup()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null if quiet else 2, 1)
        if quiet:
            os.dup2(null, 2)
        for fd in (replies, null):  # the request pipe (fd 0) was replaced by dup2
            with contextlib.suppress(OSError):
                os.close(fd)
        module, _, function = entry.partition(":")
        sys.argv = argv
        result = getattr(importlib.import_module(module), function)()
        code = result if isinstance(result, int) else 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # a child must never return into the server loop
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reply(out: IO[str], message: dict[str, object]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def serve(preload: Sequence[str], entry: str) -> None:
    """The server's loop: import ``preload``, say ready, fork one child per request line until stdin closes."""
    out = os.fdopen(os.dup(1), "w")  # replies; fd 1 itself now points at stderr, so stray prints cannot corrupt them
    os.dup2(2, 1)
    try:
        for module in (*preload, entry.partition(":")[0]):  # the entry's own module too
            importlib.import_module(module)
    except Exception as err:  # any import failure is reported; the parent falls back
        _reply(out, {"status": "failed", "error": f"{type(err).__name__}: {err}"})
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    _reply(out, {"status": _READY})
    for line in sys.stdin:
        request = json.loads(line)
        if threading.active_count() != 1:
            _reply(out, {"error": f"{threading.active_count()} threads in the fork server; refusing to fork"})
            continue
        pid = os.fork()
        if pid == 0:
            _run_child(entry, [str(a) for a in request["argv"]], bool(request.get("quiet")), out.fileno())
        _reply(out, {"pid": pid})


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the fork server process."""
    parser = argparse.ArgumentParser(prog="fedseg-forkserver", description="Preload modules, fork per launch.")
    parser.add_argument("--preload", action="append", default=[], help="a module to import once (repeat)")
    parser.add_argument("--entry", required=True, help="module:function each child runs")
    args = parser.parse_args(argv)
    serve(args.preload, args.entry)


if __name__ == "__main__":
    main()
