"""deploy/: the compose federation, Prometheus config, Grafana mounts and Dockerfile agree with each other.

Nothing here builds or runs a container (deploy/test-images.sh does, outside the default run); these checks keep the
files consistent: every /metrics port a service opens is scraped, every mount exists, traffic stays on loopback.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fedseg.server.configfile import load_server_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _compose() -> dict[str, dict[str, object]]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]


def _defaults(value: str) -> str:
    """``value`` with every ``${NAME:-default}`` compose would expand replaced by its default."""
    return re.sub(r"\$\{[A-Za-z0-9_]+:-([^}]*)\}", r"\1", value)


def test_every_metrics_port_is_scraped_by_prometheus() -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    scraped = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    opened = set()
    for service in _compose().values():
        command = service.get("command", [])
        assert isinstance(command, list)
        if "--metrics-port" in command:
            opened.add(f"127.0.0.1:{_defaults(str(command[command.index('--metrics-port') + 1]))}")
    assert opened == scraped == {"127.0.0.1:9300", "127.0.0.1:9301", "127.0.0.1:9302"}


def test_services_use_the_host_network_and_existing_mounts() -> None:
    for name, service in _compose().items():
        assert service.get("network_mode") == "host", name
        for volume in service.get("volumes", []):  # type: ignore[attr-defined]
            source = str(volume).split(":")[0]
            if source.startswith("./") and not source.startswith("./data"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_server_config_listens_on_loopback_and_dockerfile_takes_a_base(tmp_path: Path) -> None:
    raw = (DEPLOY / "server.toml").read_text()
    without_data = re.sub(r"(?ms)^\[validation\].*?(?=^\[|\Z)", "", raw)
    certs = tmp_path / "certs"  # the container's /certs and /data do not exist here
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("placeholder")
    without_data = without_data.replace('"/certs/', f'"{certs}/')
    path = tmp_path / "server.toml"
    path.write_text(without_data)
    assert load_server_config(path).loopback
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim\nFROM \$\{BASE\}$", dockerfile, re.M)
