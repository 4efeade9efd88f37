"""A real Prometheus scrapes a loopback federation: `fed-server start` and two `fed-client join`, 2 rounds.

Prometheus (Debian's `prometheus` package: `apt-get install -y prometheus`) scrapes the three ``/metrics``
endpoints every second; the values are read back through its HTTP query API, not from the text format.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fedseg.common.runtime.processes import free_port
from fedseg.common.synthetic.phantoms import generate_phantoms
from fedseg.server.run.history import read_history

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),  # ~90 s on a quiet machine; a 2-core machine shared by many runs took 10 min
    pytest.mark.skipif(PROMETHEUS is None, reason="needs the prometheus binary (apt-get install -y prometheus)"),
]
CLI = "from fedseg.{side}.cli.main import main; main()"
SITES = ("site-1", "site-2")


def _spawn(side: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", CLI.format(side=side), *args], env=env, stdout=handle, stderr=subprocess.STDOUT
        )


def _join(name: str, data: Path, port: int, tmp_path: Path) -> list[str]:
    return ["join", "--site", name, "--data", str(data / name), "--server", f"127.0.0.1:{port}", "--workdir",
            str(tmp_path / "sites" / name)]  # fmt: skip


def _server_toml(tmp_path: Path, data: Path, port: int, metrics_port: int) -> Path:
    config = {
        "rounds": 2,
        "min_sites": 2,
        "round_timeout": 600.0,
        "site_wait_timeout": 600.0,
        "output_dir": str(tmp_path / "run"),
        "port": port,
        "metrics": {"port": metrics_port},
        "model": {"feature_scale": 64},
        "train": {"steps": 3, "batch_size": 2, "patch_size": [16, 16, 16], "amp": False, "augment": False},
        "validation": {"data": str(data / "validation"), "labels": str(data / "validation" / "labels.toml")},
    }
    path = tmp_path / "server.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def _prometheus_config(path: Path, targets: dict[str, int]) -> Path:
    jobs = "".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        for job, port in targets.items()
    )
    path.write_text(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{jobs}")
    return path


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def query(port: int, expr: str) -> dict[str, float]:
    """An instant query: {job (or metric labels) -> value}."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    result = _get(url)["data"]["result"]
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in result}


def wait_for(port: int, expr: str, at_least: float, timeout: float = 60) -> dict[str, float]:
    """Query ``expr`` until every series (two sites) has reached ``at_least`` or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while True:
        found = query(port, expr)
        if (len(found) >= 2 and min(found.values()) >= at_least) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def values_over_time(port: int, expr: str, start: float, end: float) -> list[float]:
    """Every value of a single series between ``start`` and ``end`` (1 s steps)."""
    params = {"query": expr, "start": f"{start:.0f}", "end": f"{end:.0f}", "step": "1"}
    result = _get(f"http://127.0.0.1:{port}/api/v1/query_range?" + urllib.parse.urlencode(params))["data"]["result"]
    return [float(v) for _, v in result[0]["values"]] if result else []


def _wait_ready(port: int, prometheus: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert prometheus.poll() is None, "prometheus exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("prometheus did not become ready")


def test_prometheus_scrapes_server_and_sites(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_phantoms(data, sites=2, cases_per_site=2, val_cases=1, size=(16, 16, 16))
    port, server_metrics, prom_port = free_port(), free_port(), free_port()
    site_metrics = {name: free_port() for name in SITES}
    targets = {"server": server_metrics} | {name.replace("-", "_"): p for name, p in site_metrics.items()}
    prom_cfg = _prometheus_config(tmp_path / "prometheus.yml", targets)
    prometheus = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={prom_cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=(tmp_path / "prometheus.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    started = time.time()
    server = sites = None
    try:
        _wait_ready(prom_port, prometheus)
        config = _server_toml(tmp_path, data, port, server_metrics)
        server = _spawn("server", ["start", "--config", str(config)], env, tmp_path / "server.log")
        sites = [
            _spawn(
                "client",
                [*_join(name, data, port, tmp_path), "--metrics-port", str(site_metrics[name])],
                env,
                tmp_path / f"{name}.log",
            )
            for name in SITES
        ]
        server.wait(timeout=1000)
        ended = time.time()
        assert server.returncode == 0, (tmp_path / "server.log").read_text()[-2000:]
        assert [r.round for r in read_history(tmp_path / "run")] == [0, 1, 2]

        rounds = values_over_time(prom_port, "fedseg_server_round", started, ended)
        assert rounds and max(rounds) == 2 and 1 in rounds, rounds
        assert rounds == sorted(rounds), "the round only advances"
        dice = query(prom_port, 'max_over_time(fedseg_server_dice{organ="mean"}[10m])')
        assert len(dice) == 1 and 0.0 <= next(iter(dice.values())) <= 1.0
        received = query(prom_port, "max_over_time(fedseg_server_received_bytes_total[10m])")
        assert sorted(json.loads(k)["site"] for k in received) == list(SITES)
        assert all(v > 0 for v in received.values())
        sent = query(prom_port, "sum(max_over_time(fedseg_server_sent_bytes_total[10m]))")
        assert next(iter(sent.values())) == pytest.approx(sum(received.values()))  # same model both ways
        used = query(prom_port, "max_over_time(fedseg_server_replies_used_total[10m])")
        assert list(used.values()) == [4.0]
        training = query(prom_port, 'max_over_time(fedseg_server_phase_seconds_count{phase="training"}[10m])')
        assert list(training.values()) == [2.0]

        # the sites keep running after the run: wait until Prometheus has scraped their last round
        completed = wait_for(prom_port, 'max_over_time(fedseg_site_rounds_total{outcome="completed"}[10m])', 2)
        assert sorted(completed.values()) == [2.0, 2.0]
        site_rounds = query(prom_port, "max_over_time(fedseg_site_round[10m])")
        assert sorted(site_rounds.values()) == [2.0, 2.0]
        steps = query(prom_port, "max_over_time(fedseg_site_steps_done[10m])")
        assert sorted(steps.values()) == [3.0, 3.0]
        used_cases = query(prom_port, "max_over_time(fedseg_site_cases_used[10m])")
        assert sorted(used_cases.values()) == [2.0, 2.0]
    finally:
        for child in sites or []:
            child.send_signal(signal.SIGTERM)
        for child in sites or []:
            child.wait(timeout=60)
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
        prometheus.terminate()
        prometheus.wait(timeout=30)
