"""A site's round as the ClientApp reports it, read back by fed-client join into metrics."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from fedseg.client.telemetry import SITE_METRICS, ConnectionWatch, RoundReporter, SiteMetrics, split_address
from fedseg.common.runtime.events import EventTail, EventWriter
from fedseg.common.runtime.processes import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_round_events_become_site_metrics(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    clock = Clock()
    report = RoundReporter(EventWriter(path), 3, clock=clock)
    report.start(steps=10)
    clock.now = 2.0
    report.phase("load", 2.0)
    report.cases(4)
    for step in range(1, 11):
        clock.now = 12.0 + 0.25 * step  # 4 steps/s after 10 s of set-up; reported at most once a second + the end
        report.step(step, 10, loss=1.0 / step, speed=8.0)
    report.phase("train", 2.5)
    report.end(ok=True, loss=0.3)
    events = EventTail(path).read()
    steps = [e["step"] for e in events if e["kind"] == "progress"]
    assert steps == [1, 5, 9, 10]

    registry = CollectorRegistry()
    metrics = SiteMetrics(registry, "site-a", "cpu")
    for event in events:
        metrics.apply(event)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("fedseg_site_round") == 3
    assert value("fedseg_site_steps_done") == 10 and value("fedseg_site_steps_planned") == 10
    assert value("fedseg_site_steps_per_second") == 4.0
    assert value("fedseg_site_loss") == 0.1
    assert value("fedseg_site_cases_used") == 4
    assert value("fedseg_site_phase_seconds_sum", phase="load") == 2.0
    assert value("fedseg_site_phase_seconds_sum", phase="round") == 14.5
    assert value("fedseg_site_rounds_total", outcome="completed") == 1
    assert value("fedseg_site_rounds_total", outcome="failed") == 0
    assert value("fedseg_site_state", state="connected") == 1
    assert value("fedseg_site_info", site="site-a", device="cpu") == 1
    names = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    assert names == set(SITE_METRICS) - {"fedseg_site_cuda_peak_memory_bytes"}  # a CPU site has no CUDA gauge
    gpu = CollectorRegistry()
    SiteMetrics(gpu, "site-b", "cuda").apply({"kind": "round_end", "round": 1, "ok": True, "seconds": 1.0,
                                             "cuda_peak_bytes": 2048})  # fmt: skip
    assert gpu.get_sample_value("fedseg_site_cuda_peak_memory_bytes") == 2048
    assert {m.name + ("_total" if m.type == "counter" else "") for m in gpu.collect()} == set(SITE_METRICS)


def test_a_dp_sites_epsilon_is_exported_at_its_delta(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    report = RoundReporter(EventWriter(path), 2, clock=Clock())
    report.start(steps=1)
    report.end(ok=True, loss=0.4, epsilon=3.25, delta=1e-5)
    registry = CollectorRegistry()
    metrics = SiteMetrics(registry, "site-a", "cpu")
    for event in EventTail(path).read():
        metrics.apply(event)
    assert registry.get_sample_value("fedseg_site_epsilon", {"delta": "1e-05"}) == 3.25
    plain = CollectorRegistry()
    SiteMetrics(plain, "site-b", "cpu").apply({"kind": "round_end", "round": 1, "ok": True, "seconds": 1.0})
    assert not [s for m in plain.collect() if m.name == "fedseg_site_epsilon" for s in m.samples]  # no DP: no ε


def test_a_step_that_was_not_finite_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    report = RoundReporter(EventWriter(path), 1, clock=Clock())
    report.start(steps=1)
    report.step(1, 1, loss=float("nan"), speed=1.0)  # a skipped step: json.dumps(allow_nan=False) raised here
    report.end(ok=True, loss=float("inf"))
    events = EventTail(path).read()
    assert [e.get("loss", "absent") for e in events if e["kind"] in ("progress", "round_end")] == [None, None]
    registry = CollectorRegistry()
    metrics = SiteMetrics(registry, "site-a", "cpu")
    for event in events:
        metrics.apply(event)
    assert registry.get_sample_value("fedseg_site_steps_done") == 1


def test_connection_watch_tells_connecting_from_connected() -> None:
    metrics = SiteMetrics(CollectorRegistry(), "s", "cpu")
    changes: list[str] = []
    port = free_port()
    clock = Clock()
    watch = ConnectionWatch(f"127.0.0.1:{port}", metrics, on_change=changes.append, every=5, clock=clock)
    watch.tick()
    assert changes == ["connecting"]
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        watch.tick()  # not due yet
        assert changes == ["connecting"]
        clock.now = 5.0
        watch.tick()
    assert changes == ["connecting", "connected"]
    assert split_address("[::1]:9092") == ("::1", 9092)
