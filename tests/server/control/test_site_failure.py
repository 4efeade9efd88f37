"""A site's SuperNode killed mid-round: the round ends at the timeout with the other site, the join restarts
the SuperNode, the next round has both sites again, and nothing is left running afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import tomli_w

from fedseg.common.runtime.processes import free_port, tagged_processes
from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.run.history import read_history

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")]

TAG = "FEDSEG_FAULT_TAG"
#: Ends round 2 (the killed site never replies), and must also cover round 3 at the restarted site: a new
#: SuperNode's first ClientApp (FAB install, torch import: 25 s on a quiet 2-core machine) plus training. 60 s
#: was too short on CI, where the restarted site-2 missed round 3.
ROUND_TIMEOUT = 90.0
CLI = "from fedseg.{}.cli.main import main; main()"


def _supernode_of(workdir: Path) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "fedseg.client.pollnode" in cmdline and str(workdir) in cmdline:
                return int(entry.name)
    return None


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _join(name: str, data: Path, port: int, workdir: Path) -> list[str]:
    args = ["join", "--site", name, "--data", str(data / name), "--server", f"127.0.0.1:{port}"]
    return [sys.executable, "-c", CLI.format("client"), *args, "--workdir", str(workdir)]


def test_killed_site_does_not_hang_the_federation_and_rejoins(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_phantoms(data, sites=2, cases_per_site=2, val_cases=0, size=(16, 16, 16))
    port = free_port()
    config = {
        "rounds": 3,
        "min_sites": 2,
        "round_timeout": ROUND_TIMEOUT,
        "site_wait_timeout": 120.0,
        "port": port,
        "output_dir": str(tmp_path / "run"),
        "model": {"feature_scale": 64},
        "train": {"steps": 150, "batch_size": 2, "patch_size": [16, 16, 16], "amp": False},
    }
    (tmp_path / "server.toml").write_text(tomli_w.dumps(config))
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG: tag, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    server = subprocess.Popen(
        [sys.executable, "-c", CLI.format("server"), "start", "--config", str(tmp_path / "server.toml")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    workdirs = {name: tmp_path / f"w-{name}" for name in ("site-1", "site-2")}
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in workdirs}
    sites = [
        subprocess.Popen(_join(name, data, port, workdir), env=env, stdout=logs[name], stderr=subprocess.STDOUT)
        for name, workdir in workdirs.items()
    ]
    try:
        app_log = workdirs["site-2"] / "logs" / "clientapp.log"
        deadline = time.monotonic() + 400  # a ceiling, not a wait: the loop ends on the log line
        while "round 2: training" not in _text(app_log) and time.monotonic() < deadline:
            time.sleep(0.1)  # kill site-2 while it trains round 2 (150 steps: a few seconds)
        victim = _supernode_of(workdirs["site-2"])
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        output, _ = server.communicate(timeout=600)
    finally:
        for site in sites:
            site.send_signal(signal.SIGTERM)
        for site in sites:
            site.wait(timeout=120)
        for handle in logs.values():
            handle.close()
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, output[-2000:]
    rows = read_history(tmp_path / "run")
    assert [r.round for r in rows] == [0, 1, 2, 3]
    assert [s.site for s in rows[2].sites] == ["site-1"]
    assert rows[2].failures == 1
    assert rows[2].seconds < ROUND_TIMEOUT + 60.0  # ended by the timeout (or Flower's heartbeat), not hung
    site_log = (tmp_path / "site-2.log").read_text(errors="replace")
    assert sorted(s.site for s in rows[3].sites) == ["site-1", "site-2"], (rows[3], site_log[-3000:])
    assert "restart 1)" in site_log.replace("\n", " ")
    deadline = time.monotonic() + 60
    while (left := tagged_processes(tag, TAG)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []
