"""The Grafana board in deploy/grafana only queries metrics that fedseg exports, through the provisioned source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from fedseg.client.telemetry import SITE_METRICS
from fedseg.server.control.metrics import SERVER_METRICS

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
NAME = re.compile(r"\bfedseg_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _base(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in SERVER_METRICS + SITE_METRICS:
            return name.removesuffix(suffix)
    return name


def _dashboard() -> dict[str, object]:
    return json.loads((GRAFANA / "dashboards" / "fedseg.json").read_text(encoding="utf-8"))


def test_every_panel_queries_exported_metrics_only() -> None:
    exported = set(SERVER_METRICS) | set(SITE_METRICS)
    panels = _dashboard()["panels"]
    assert isinstance(panels, list) and panels
    used: set[str] = set()
    for panel in panels:
        names = {_base(n) for t in panel["targets"] for n in NAME.findall(t["expr"])}
        assert names, f"panel {panel['title']!r} queries no fedseg metric"
        assert names <= exported, f"panel {panel['title']!r} queries unknown {names - exported}"
        used |= names
    # what the issue asks the board to show: rounds, Dice per organ, site throughput and failures, bytes, phases
    wanted = {
        "fedseg_server_round",
        "fedseg_server_dice",
        "fedseg_site_steps_per_second",
        "fedseg_site_rounds_total",
        "fedseg_server_replies_rejected_total",
        "fedseg_server_sent_bytes_total",
        "fedseg_server_received_bytes_total",
        "fedseg_server_phase_seconds",
    }
    assert wanted <= used, wanted - used


def test_panels_use_the_provisioned_datasource() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uids = {s["uid"] for s in sources["datasources"]}
    for panel in _dashboard()["panels"]:
        assert panel["datasource"]["uid"] in uids
        assert all(t["datasource"]["uid"] in uids for t in panel["targets"])
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fedseg.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_check_catches_an_unknown_metric() -> None:
    assert _base("fedseg_server_phase_seconds_bucket") == "fedseg_server_phase_seconds"
    assert _base("fedseg_server_nonsense_count") not in set(SERVER_METRICS) | set(SITE_METRICS)
