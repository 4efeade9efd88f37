"""The flwr CLI glue: connection file, JSON status parsing, SuperLink command line and health URL."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedseg.common.errors import FedsegError
from fedseg.common.runtime.flwrctl import CONNECTION, flower_env, parse_run_status, write_connection
from fedseg.server.config import ServerConfig, TLSConfig
from fedseg.server.control.superlink import health_url, local_address, superlink_argv

LS_ANSWER = {
    "success": True,
    "runs": [
        {
            "run-id": "1",
            "status": "finished:completed",
            "status-details": "N/A",
            "elapsed": 13.5,
            "network-traffic": {"inbound-bytes": 5052, "outbound-bytes": 7316, "total-bytes": 12368},
        }
    ],
}


def test_parse_run_status() -> None:
    status = parse_run_status(LS_ANSWER)
    assert status.finished and status.succeeded
    assert (status.elapsed, status.bytes_in, status.bytes_out) == (13.5, 5052, 7316)
    failed = parse_run_status({"success": True, "runs": [{"status": "finished:failed"}]})
    assert failed.finished and not failed.succeeded
    assert (status.outcome, failed.outcome) == ("completed", "failed")
    assert not parse_run_status({"success": True, "runs": [{"status": "running"}]}).finished
    with pytest.raises(FedsegError, match="flwr ls failed: no such run"):
        parse_run_status({"success": False, "error-message": "no such run"})


def test_write_connection_insecure_and_tls(tmp_path: Path) -> None:
    path = write_connection(tmp_path / "home", "127.0.0.1:9092", None)
    data = tomllib.loads(path.read_text())
    assert data["superlink"]["default"] == CONNECTION
    assert data["superlink"][CONNECTION] == {"address": "127.0.0.1:9092", "insecure": True}
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    data = tomllib.loads(write_connection(tmp_path / "home", "h:1", ca).read_text())
    assert data["superlink"][CONNECTION] == {"address": "h:1", "root-certificates": str(ca.resolve())}


def test_flower_env_is_quiet_and_private(tmp_path: Path) -> None:
    env = flower_env(tmp_path, {"X": "1"})
    assert env["FLWR_HOME"] == str(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["X"] == "1"


def test_superlink_argv_loopback_only_insecure_by_default_and_tls_when_configured(tmp_path: Path) -> None:
    argv = superlink_argv(ServerConfig(port=9092), 1234)
    assert argv[1:] == [
        "--host",
        "127.0.0.1",
        "--port",
        "1234",
        "--isolation",
        "process",
        "--disable-runtime-dependency-installation",
        "--insecure",
    ]
    tls = TLSConfig(ca=tmp_path / "ca", cert=tmp_path / "c", key=tmp_path / "k")
    argv = superlink_argv(ServerConfig(host="0.0.0.0", tls=tls, database=tmp_path / "db.sqlite"), 77)
    assert argv[1:5] == ["--host", "127.0.0.1", "--port", "77"]  # never the public host: the gateway serves that
    assert "--insecure" not in argv
    assert argv[argv.index("--ssl-certfile") + 1] == str(tmp_path / "c")
    assert argv[-3:] == ["--database", str(tmp_path / "db.sqlite"), "--enable-supernode-auth"]


def test_local_address_dials_loopback_for_wildcard_hosts() -> None:
    assert local_address(ServerConfig(host="0.0.0.0", port=5)) == "127.0.0.1:5"
    assert health_url(ServerConfig(port=5), 6) == "http://127.0.0.1:6/health"
