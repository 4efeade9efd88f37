"""Drive the ``flwr`` CLI against our own SuperLink: a private FLWR_HOME connection, run submission and status.

``flwr run <APP> <CONNECTION>`` takes a connection *name* from ``$FLWR_HOME/config.toml``, so each server
output folder gets its own FLWR_HOME with one connection called ``fedseg``. Every ``flwr`` call is a
subprocess with JSON output (``--format json``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedseg.common.errors import FedsegError
from fedseg.common.runtime.processes import die_with_parent

log = logging.getLogger(__name__)

CONNECTION = "fedseg"
#: Flower's environment switches we always set: no telemetry, no update check, no runtime ``uv sync``.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: ours plus FLWR_HOME, the quiet switches and the venv on PATH.

    Flower daemons start ``flower-superexec`` by name, so the interpreter's ``bin`` folder goes first on PATH.
    """
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["FLWR_HOME"] = str(home)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.pop("PYTHONSTARTUP", None)
    if extra:
        env.update(extra)
    return env


def flower_executable(name: str) -> str:
    """Absolute path of a Flower console script (``flwr``, ``flower-superlink``, ...).

    Raises:
        FedsegError: it is not installed next to this interpreter nor on PATH.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedsegError(f"'{name}' was not found; install flwr 1.42 in this environment (pip install fedseg)")
    return found


def write_connection(home: Path, address: str, root_certificates: Path | None) -> Path:
    """Write ``home/config.toml`` with one connection named :data:`CONNECTION` (insecure without a CA)."""
    home.mkdir(parents=True, exist_ok=True)
    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates.resolve())
    path = home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}), encoding="utf-8")
    return path


@dataclass(frozen=True)
class RunStatus:
    """One ``flwr ls --run-id`` answer.

    Attributes:
        status: e.g. ``pending``, ``running``, ``finished:completed``, ``finished:failed``.
        details: Flower's status details ("N/A" when none).
        elapsed: seconds since the run started.
        bytes_in / bytes_out: network traffic the SuperLink counted for the run.
    """

    status: str
    details: str
    elapsed: float
    bytes_in: int
    bytes_out: int

    @property
    def finished(self) -> bool:
        """Whether the run has ended, successfully or not."""
        return self.status.startswith("finished")

    @property
    def outcome(self) -> str:
        """The status as a person reads it: ``completed``, ``failed``, ``stopped``, ``running``, ``pending``..."""
        return self.status.removeprefix("finished:")

    @property
    def succeeded(self) -> bool:
        """Whether the run ended with ``finished:completed``."""
        return self.status == "finished:completed"


def parse_run_status(payload: Mapping[str, Any]) -> RunStatus:
    """Turn the JSON of ``flwr ls --run-id ID --format json`` into a :class:`RunStatus`.

    Raises:
        FedsegError: the answer reports a failure or holds no run.
    """
    if not payload.get("success", False) or not payload.get("runs"):
        raise FedsegError(f"flwr ls failed: {payload.get('error-message', payload)}")
    run = payload["runs"][0]
    traffic = run.get("network-traffic", {})
    return RunStatus(
        status=str(run.get("status", "unknown")),
        details=str(run.get("status-details", "")),
        elapsed=float(run.get("elapsed", 0.0)),
        bytes_in=int(traffic.get("inbound-bytes", 0)),
        bytes_out=int(traffic.get("outbound-bytes", 0)),
    )


class FlowerControl:
    """The ``flwr`` CLI bound to one FLWR_HOME and connection.

    Args:
        home: FLWR_HOME folder holding ``config.toml`` (see :func:`write_connection`).
        env: extra environment for the CLI calls.
    """

    def __init__(self, home: Path, env: Mapping[str, str] | None = None) -> None:
        self.home = home.resolve()
        self.env = flower_env(self.home, env)
        self.flwr = flower_executable("flwr")

    def _call(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        argv = [self.flwr, *args, "--format", "json"]
        log.debug("running %s", " ".join(argv))
        try:
            # cwd=home: flwr reads a connection name that is also a folder of the cwd (e.g. a clone's fedseg/) as an app
            done = subprocess.run(  # killed with us: no `flwr` call outlives a killed fed-server
                argv,
                env=self.env,
                cwd=self.home,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                preexec_fn=die_with_parent(),
            )
        except subprocess.TimeoutExpired as err:
            raise FedsegError(f"'flwr {args[0]}' did not answer within {timeout:.0f} s") from err
        try:
            payload: dict[str, Any] = json.loads(done.stdout)
        except json.JSONDecodeError:
            lines = (done.stderr or done.stdout).strip().splitlines()
            message = lines[-1] if lines else f"exit code {done.returncode}"
            raise FedsegError(f"'flwr {args[0]}' failed: {message}") from None
        if not payload.get("success", False):
            raise FedsegError(f"'flwr {args[0]}' failed: {payload.get('error-message', payload)}")
        return payload

    def submit(self, app_dir: Path, run_config: Path) -> int:
        """Submit the Flower App in ``app_dir`` as a new run with run-config overrides from a TOML file.

        Returns:
            The run id.
        """
        payload = self._call("run", str(app_dir.resolve()), CONNECTION, "--run-config", str(run_config.resolve()))
        return int(payload["run-id"])

    def status(self, run_id: int) -> RunStatus:
        """The current status of a run."""
        return parse_run_status(self._call("ls", CONNECTION, "--run-id", str(run_id), timeout=60.0))

    def register_node(self, public_key: Path, name: str) -> int:
        """Register a SuperNode's public key under ``name``; return the node id the SuperLink gave it."""
        payload = self._call("supernode", "register", str(public_key), CONNECTION, "--name", name)
        return int(payload["node-id"])

    def unregister_node(self, node_id: int) -> None:
        """Remove a registered SuperNode (its key can no longer connect)."""
        self._call("supernode", "unregister", str(node_id), CONNECTION)

    def registered_nodes(self) -> set[int]:
        """The node ids the SuperLink knows and has not unregistered (online, offline or never connected)."""
        payload = self._call("supernode", "list", CONNECTION, timeout=60.0)
        gone = {"unregistered", "deleted"}
        return {int(node["node-id"]) for node in payload.get("nodes", []) if node.get("status") not in gone}

    def stop(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (best effort; errors are logged, not raised)."""
        try:
            self._call("stop", str(run_id), CONNECTION, timeout=30.0)
        except FedsegError as err:
            log.debug("stopping run %d: %s", run_id, err)
