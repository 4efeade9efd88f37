"""Child-process supervision with no orphans: process groups, SIGTERM then SIGKILL, and a sweep of descendants.

Flower's daemons spawn helpers that leave our process group (the SuperLink's ``flower-superexec`` calls
``setsid``, and it starts ``flwr-serverapp`` in that new session), so killing a group is not enough. The
:class:`Supervisor` therefore (1) starts every child in its own session with a parent-death signal, (2) makes
this process a *child subreaper* on Linux so that orphaned grandchildren are re-parented to us instead of
``init``, (3) tags every child's environment (inherited by all its descendants), and (4) on exit terminates
every child's whole tree, escalating from SIGTERM to SIGKILL after a timeout, then kills anything left that
still carries the tag.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_LINUX = sys.platform.startswith("linux")

#: Environment variable marking every process started by a :class:`Supervisor` (inherited by descendants).
TAG_VARIABLE = "FEDSEG_SUPERVISOR_TAG"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def host_port(host: str, port: int) -> str:
    """``host:port`` as Flower and gRPC dial it (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine's loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _prctl(option: int, value: int) -> bool:
    if not _LINUX:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, value, 0, 0, 0)) == 0


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux); returns whether it worked."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when its parent (thread) dies (Linux; None
    elsewhere). Start such children from the main thread: the signal follows the thread that forked them."""
    if not _LINUX:
        return None

    def setup() -> None:  # runs in the child between fork and exec
        _prctl(_PR_SET_PDEATHSIG, sig)

    return setup


def _child_setup() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _parent_map() -> dict[int, int]:
    """pid -> parent pid of every live process (Linux /proc); empty elsewhere."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir() if _LINUX else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces; fields after it are fixed.
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Live (non-zombie) descendants of ``pid``, children first."""
    children: dict[int, list[int]] = {}
    for child, parent in _parent_map().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        current = stack.pop(0)
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    return pid in _parent_map() if _LINUX else _posix_alive(pid)


def _posix_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tagged_processes(tag: str, variable: str = TAG_VARIABLE) -> list[int]:
    """Live processes whose environment carries ``<variable>=<tag>`` (Linux /proc; [] elsewhere)."""
    needle = f"{variable}={tag}".encode()
    found = []
    for pid in _parent_map():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(pid)
    return found


def reap(pids: Sequence[int]) -> None:
    """Collect the exit status of those ``pids`` that are (re-parented) children of ours and have exited."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


@dataclass
class Child:
    """A supervised child process."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path | None
    log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def log_tail(self, lines: int = 5) -> str:
        """The last ``lines`` lines of the child's log file ("" when it has none)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def stop_tree(pid: int, timeout: float = 10.0) -> None:
    """Terminate ``pid``, its process group and all its descendants: SIGTERM, wait, then SIGKILL.

    Args:
        pid: the root process (a group leader started with ``start_new_session``).
        timeout: seconds to wait after SIGTERM before SIGKILL.
    """
    tree = [pid, *descendants(pid)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    _signal(tree, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = [p for p in tree if _alive(p)]
        if not tree:
            return
        time.sleep(0.1)
    log.warning("processes %s ignored SIGTERM for %.0f s; sending SIGKILL", tree, timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _signal([*tree, *(d for p in tree for d in descendants(p))], signal.SIGKILL)


class Supervisor:
    """Start child processes and guarantee that all of them (and their descendants) are gone on exit.

    Use as a context manager. SIGTERM and SIGINT to this process become ``KeyboardInterrupt`` inside the
    block, so ``fed-server`` cleans up the same way for Ctrl-C, ``kill`` and errors.

    Args:
        stop_timeout: seconds between SIGTERM and SIGKILL for each child tree.
    """

    def __init__(self, stop_timeout: float = 10.0) -> None:
        self.stop_timeout = stop_timeout
        self.tag = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.children: list[Child] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Supervisor:
        become_subreaper()
        if _is_main_thread():
            # SIGINT too: a process started in the background inherits "ignore SIGINT" from the shell.
            self._previous = {
                signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt),
                signal.SIGINT: signal.signal(signal.SIGINT, _raise_interrupt),
            }
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._previous:  # a second Ctrl-C must not interrupt the clean-up half way
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            self.stop_all()
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)  # type: ignore[arg-type]

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> Child:
        """Start ``argv`` in a new session, stdout/stderr appended to ``log_path`` (or discarded).

        Raises:
            FileNotFoundError: the executable is not on PATH.
        """
        log_file: IO[bytes] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = log_path.open("ab")
        child_env = dict(env) if env is not None else dict(os.environ)
        child_env[TAG_VARIABLE] = self.tag
        process = subprocess.Popen(
            list(argv),
            env=child_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file if log_file is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup if _LINUX else None,
        )
        child = Child(name=name, process=process, log_path=log_path, log_file=log_file)
        self.children.append(child)
        log.debug("started %s (pid %d): %s", name, process.pid, " ".join(argv))
        return child

    def stop(self, child: Child) -> None:
        """Stop one child's whole tree and forget it."""
        if child.process.poll() is None or descendants(child.pid):
            stop_tree(child.pid, self.stop_timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=self.stop_timeout)
        if child.log_file is not None:
            child.log_file.close()
        if child in self.children:
            self.children.remove(child)
        log.debug("stopped %s (exit code %s)", child.name, child.process.returncode)

    def stop_all(self) -> None:
        """Stop children in reverse start order, then kill any process still carrying our tag."""
        for child in reversed(list(self.children)):
            self.stop(child)
        leftovers = tagged_processes(self.tag)
        if leftovers:
            log.debug("killing leftover processes %s", leftovers)
            _signal(leftovers, signal.SIGKILL)
            time.sleep(0.2)
            reap(leftovers)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def supervised(stop_timeout: float = 10.0) -> Iterator[Supervisor]:
    """``with supervised() as sup:`` shorthand for :class:`Supervisor`."""
    with Supervisor(stop_timeout) as sup:
        yield sup
