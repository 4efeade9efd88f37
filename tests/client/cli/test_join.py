"""`fed-client join`: no SuperNode for a refused transport, and "connected" only after the SuperLink activated it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from fedseg.client.cli import join as join_cli
from fedseg.client.cli.main import app
from fedseg.client.supernode import SupernodeLog
from fedseg.client.telemetry import SiteMetrics
from fedseg.common.runtime.processes import free_port

runner = CliRunner()


@pytest.fixture
def no_supernode(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records any attempt of `join` to start the SuperNode (none must happen in these tests)."""
    started: list[object] = []
    monkeypatch.setattr(join_cli, "run_supernode", lambda *args, **kwargs: started.append(args))
    return started


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--server", "10.1.2.3:9092"], "--server 10.1.2.3:9092 is not on this machine and --root-certificates is"),
        (["--auth-key", "KEY"], "--auth-key needs --root-certificates: node authentication works over HTTPS only"),
    ],
)
def test_no_supernode_starts_without_tls_where_it_is_needed(
    phantom_root: Path, tmp_path: Path, no_supernode: list[object], flags: list[str], message: str
) -> None:
    key = tmp_path / "site-key"
    key.write_text("a key")
    flags = [str(key) if flag == "KEY" else flag for flag in flags]
    data = phantom_root / "site-1"  # usable data: without the check, join would go on to start the SuperNode
    result = runner.invoke(app, ["join", "--site", "s1", "--data", str(data), "--workdir", str(tmp_path), *flags])
    assert result.exit_code == 1
    assert no_supernode == []
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]


def test_the_control_join_does_start_the_supernode(
    phantom_root: Path, tmp_path: Path, no_supernode: list[object]
) -> None:
    data = phantom_root / "site-1"
    result = runner.invoke(app, ["join", "--site", "s1", "--data", str(data), "--workdir", str(tmp_path),
                                 "--server", "10.1.2.3:9092", "--insecure", "--cold-start"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(no_supernode) == 1


def test_connected_only_once_the_supernode_is_activated(tmp_path: Path) -> None:
    port = free_port()
    node_log = SupernodeLog(tmp_path / "supernode.log")
    node_log.path.write_text("INFO: an older process\nINFO:      SuperNode ID: 1\n")  # a previous run's activation
    node_log.begin()
    with node_log.path.open("a") as file:
        file.write("INFO:      Starting Flower SuperNode\n")
    changes: list[str] = []
    metrics = SiteMetrics(CollectorRegistry(), "s", "cpu")
    now = [0.0]
    watch = join_cli.ActivationWatch(f"127.0.0.1:{port}", metrics, node_log, on_change=changes.append)
    watch.clock = lambda: now[0]
    with socket.socket() as listener:  # the server answers TCP all along
        listener.bind(("127.0.0.1", port))
        listener.listen()
        watch.tick()
        now[0] = 10.0
        watch.tick()
        assert changes == ["connecting"]  # it answers, but has not activated this SuperNode
        with node_log.path.open("a") as file:
            file.write("\x1b[92mINFO \x1b[0m:      SuperNode ID: 4744119659584677191\n")
        now[0] = 10.5  # not due for a probe yet: the activation is told at once
        watch.tick()
    assert changes == ["connecting", "connected"]
    assert metrics.current_state == "connected"


def test_every_cap_of_the_policy_file_reaches_the_site(
    phantom_root: Path, tmp_path: Path, no_supernode: list[object]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("max_patch_voxels = 5000\nmin_spacing_mm = 2.0\ncross_site = false\nmax_deadline = 60\n")
    data = phantom_root / "site-1"
    args = ["join", "--site", "s1", "--data", str(data), "--workdir", str(tmp_path / "w"), "--policy", str(policy)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    ((cfg, *_),) = no_supernode  # type: ignore[misc]
    assert (cfg.max_patch_voxels, cfg.min_spacing_mm, cfg.cross_site, cfg.max_deadline) == (5000, 2.0, False, 60)  # type: ignore[attr-defined]
