"""Server metrics from hand-written ServerApp events: values, phase histograms, bounded labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from fedseg.server.control.metrics import SERVER_METRICS, ServerMetrics, reason_label


def _events() -> list[dict[str, object]]:
    return [
        {"t": 100.0, "kind": "run", "state": "running", "first_round": 1, "last_round": 3, "min_sites": 2},
        {"t": 100.0, "kind": "phase", "round": 0, "phase": "validating"},
        {"t": 102.0, "kind": "phase", "round": 1, "phase": "waiting"},
        {"t": 102.5, "kind": "sites", "connected": 1, "needed": 2},
        {"t": 104.0, "kind": "sites", "connected": 2, "needed": 2},
        {"t": 105.0, "kind": "phase", "round": 1, "phase": "training"},
        {"t": 105.0, "kind": "sampled", "round": 1, "sites": 3},
        {"t": 110.0, "kind": "reply", "round": 1, "site": "a", "outcome": "ok", "bytes_in": 10, "bytes_out": 12,
         "seconds": 5.0},
        {"t": 111.0, "kind": "reply", "round": 1, "site": "b", "outcome": "error", "bytes_in": 0, "bytes_out": 12,
         "seconds": 6.0},
        {"t": 125.0, "kind": "missing", "round": 1, "site": "node-7", "bytes_out": 12},
        {"t": 125.0, "kind": "phase", "round": 1, "phase": "aggregating"},
        {"t": 126.0, "kind": "phase", "round": 1, "phase": "validating"},
        {"t": 130.0, "kind": "round", "round": 1, "seconds": 28.0, "best": True, "used": 1,
         "dice": {"dice_liver": 0.5, "dice_pancreas": None, "dice_mean": 0.25},
         "sites": [{"site": "a", "cases": 4, "loss": 0.75, "seconds": 3.5, "update_norm": 2.0, "update_cosine": 0.25}],
         "rejected": {"norm_outlier": 1, "Patient 12 weird": 2}},
        {"t": 130.0, "kind": "phase", "round": 2, "phase": "waiting"},
        {"t": 131.0, "kind": "round", "round": 2, "seconds": 1.0, "best": False, "used": 0,
         "dice": {"dice_mean": 0.1}, "sites": []},
        {"t": 140.0, "kind": "run", "state": "completed"},
    ]  # fmt: skip


def test_events_become_metric_values() -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    for event in _events():
        metrics.apply(event)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("fedseg_server_round") == 2
    assert value("fedseg_server_last_round") == 3
    assert value("fedseg_server_sites_connected") == 2 and value("fedseg_server_sites_required") == 2
    assert value("fedseg_server_sites_sampled") == 3
    assert value("fedseg_server_rounds_completed_total") == 2
    assert value("fedseg_server_replies_used_total") == 1
    assert value("fedseg_server_replies_rejected_total", reason="error") == 1
    assert value("fedseg_server_replies_rejected_total", reason="timeout") == 1
    assert value("fedseg_server_replies_rejected_total", reason="norm_outlier") == 1
    assert value("fedseg_server_replies_rejected_total", reason="other") == 2  # free text never becomes a label
    assert value("fedseg_server_sent_bytes_total", site="a") == 12
    assert value("fedseg_server_sent_bytes_total", site="node-7") == 12
    assert value("fedseg_server_received_bytes_total", site="a") == 10
    assert value("fedseg_server_site_loss", site="a") == 0.75
    assert value("fedseg_server_update_norm", site="a") == 2.0
    assert value("fedseg_server_update_cosine", site="a") == 0.25
    assert value("fedseg_server_dice", organ="liver") == 0.5
    assert value("fedseg_server_dice", organ="pancreas") is None  # not validated: no sample rather than NaN
    assert value("fedseg_server_dice", organ="mean") == 0.1  # the latest round
    assert value("fedseg_server_best_dice") == 0.25 and value("fedseg_server_best_round") == 1
    # phases: validating 0->2 s, waiting 2 s + 1 s... each phase closed by the next one or the run's end
    assert value("fedseg_server_phase_seconds_count", phase="validating") == 2
    assert value("fedseg_server_phase_seconds_sum", phase="validating") == 2 + 4
    assert value("fedseg_server_phase_seconds_sum", phase="training") == 20
    assert value("fedseg_server_phase_seconds_sum", phase="waiting") == 3 + 10
    assert value("fedseg_server_phase", phase="training") == 0
    assert value("fedseg_server_run_state", state="completed") == 1
    assert value("fedseg_server_run_state", state="running") == 0


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Metric names as Prometheus stores them (counters with ``_total``)."""
    return {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}


def test_every_exported_name_is_listed() -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    for event in _events():
        metrics.apply(event)
    assert exported_names(registry) == set(SERVER_METRICS)
    assert all(name.startswith("fedseg_server_") for name in SERVER_METRICS)


def test_reason_labels_are_bounded() -> None:
    assert reason_label("norm_outlier") == "norm_outlier"
    assert reason_label("case_0042 failed") == "other"
    assert reason_label("x" * 40) == "other"
