"""The SLO monitor with a fake clock: burn-rate math, multiwindow alerts, feeds, outputs."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchwire.cli import main
from batchwire.config import BurnRateAlertConfig, SloConfig
from monitoring import spans as S
from monitoring.slo import SloCollector, SloMonitor, SloSpanProcessor, burn_rate, rule_label
from monitoring.slo_cli import render

FAST_S, SLOW_S = 0.005, 0.2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shrunk() -> SloConfig:
    """The default rules, with windows shrunk 720x (1 h -> 5 s, 5 min -> ~0.42 s...)."""
    return SloConfig(
        latency_threshold_ms=50,
        latency_objective=0.99,
        availability_objective=0.999,
        alerts=[
            rule("page", 14.4, long_s=5, short_s=0.5),
            rule("page", 6, long_s=30, short_s=2.5),
            rule("ticket", 1, long_s=360, short_s=30),
        ],
    )


def rule(severity: str, rate: float, *, long_s: float, short_s: float) -> BurnRateAlertConfig:
    return BurnRateAlertConfig.model_validate(
        {"severity": severity, "burn_rate": rate, "long_window_s": long_s,
         "short_window_s": short_s}
    )  # fmt: skip


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def monitor(clock: Clock) -> SloMonitor:
    return SloMonitor({"digits": shrunk()}, clock=clock)


def traffic(
    monitor: SloMonitor,
    clock: Clock,
    seconds: float,
    *,
    latency_s: float = FAST_S,
    status: str = "OK",
    rate_hz: int = 200,
) -> list[list[str]]:
    """Requests at a steady rate; evaluates every 0.1 s; returns what fired at each check."""
    fired = []
    steps = int(seconds * rate_hz)
    for i in range(steps):
        clock.now += 1 / rate_hz
        monitor.record("digits", latency_s, status)
        if i % (rate_hz // 10) == 0:
            fired.append(sorted(a.rule for a in monitor.evaluate()))
    return fired  # fmt: skip


def test_burn_rate_is_the_bad_share_over_the_budget() -> None:
    assert burn_rate(1, 100, 0.99) == pytest.approx(1.0)
    assert burn_rate(144, 1000, 0.99) == pytest.approx(14.4)
    assert burn_rate(0, 0, 0.99) == 0.0


def test_normal_traffic_fires_nothing(monitor: SloMonitor, clock: Clock) -> None:
    fired = traffic(monitor, clock, 60)
    assert not any(fired)
    state = monitor.snapshot()["digits"]
    assert state["slis"]["latency"]["good_fraction"] == 1.0
    assert state["slis"]["latency"]["budget_remaining"] == 1.0
    assert state["recent"]["latency_ms"]["p50"] == pytest.approx(FAST_S * 1000, rel=0.1)


def test_slow_engine_fires_the_fast_page_within_the_short_window_and_recovers(
    monitor: SloMonitor, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    traffic(monitor, clock, 10)
    caplog.set_level(logging.INFO, logger="monitoring.slo")
    fast_page = rule_label(shrunk().alerts[0])
    fired = traffic(monitor, clock, 1.0, latency_s=SLOW_S)
    first = next(i for i, rules in enumerate(fired) if fast_page in rules)
    # All requests slow: burn 100x; the long (5 s) window crosses 14.4x after ~0.72 s.
    assert first * 0.1 <= 1.0
    assert all(r.sli == "latency" for r in monitor.firing())
    recovered = traffic(monitor, clock, 3.0)
    assert fast_page not in recovered[-1]  # the short window emptied of slow requests
    events = [json.loads(r.getMessage()) for r in caplog.records]
    page = [e for e in events if e["rule"] == fast_page]
    assert [e["state"] for e in page] == ["firing", "resolved"]  # once per transition
    assert page[0]["burn_rate_short"] > 14.4 and page[0]["sli"] == "latency"


def test_server_errors_burn_availability_and_client_errors_do_not(
    monitor: SloMonitor, clock: Clock
) -> None:
    traffic(monitor, clock, 2, status="INVALID_ARGUMENT")
    assert monitor.snapshot()["digits"]["slis"]["availability"]["events"] == 0
    fired = traffic(monitor, clock, 1, status="INTERNAL")
    assert any(fired)
    assert {a.sli for a in monitor.firing()} == {"availability"}


def test_budget_remaining_matches_hand_computed_numbers(monitor: SloMonitor, clock: Clock) -> None:
    for i in range(1000):
        clock.now += 0.01
        monitor.record("digits", SLOW_S if i % 200 == 0 else FAST_S, "OK")  # 5 of 1000 slow
    latency = monitor.snapshot()["digits"]["slis"]["latency"]
    assert latency["events"] == 1000 and latency["bad_events"] == 5
    assert latency["budget_remaining"] == pytest.approx(1 - 0.005 / 0.01)


def test_models_without_an_objective_are_ignored(monitor: SloMonitor, clock: Clock) -> None:
    monitor.record("other", SLOW_S, "OK")
    monitor.set_objective("digits", None)
    monitor.record("digits", SLOW_S, "OK")
    assert monitor.snapshot() == {} and monitor.evaluate() == []


def test_span_processor_feeds_the_monitor_from_server_spans(
    monitor: SloMonitor, clock: Clock
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SloSpanProcessor(monitor))
    tracer = provider.get_tracer("test")
    for status, kind in (("OK", SpanKind.SERVER), ("INTERNAL", SpanKind.SERVER),
                         ("INTERNAL", SpanKind.INTERNAL)):  # fmt: skip
        span = tracer.start_span("rpc", kind=kind, start_time=0, attributes={
            S.MODEL_NAME: "digits", S.RPC_RESPONSE_STATUS_CODE: status})  # fmt: skip
        span.end(end_time=int(SLOW_S * 1e9))
    slis = monitor.snapshot()["digits"]["slis"]
    assert slis["availability"]["events"] == 2 and slis["availability"]["bad_events"] == 1
    assert slis["latency"]["events"] == 1 and slis["latency"]["bad_events"] == 1


def test_collector_exposes_objectives_burn_rates_and_alerts(
    monitor: SloMonitor, clock: Clock
) -> None:
    traffic(monitor, clock, 1, latency_s=SLOW_S)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SloCollector(monitor))
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    fast_page = rule_label(shrunk().alerts[0])
    key = (("model", "digits"), ("rule", fast_page), ("severity", "page"), ("sli", "latency"))
    assert values[("batchwire_slo_alert_firing", key)] == 1.0
    avail = (("model", "digits"), ("rule", fast_page), ("severity", "page"),
             ("sli", "availability"))  # fmt: skip
    assert values[("batchwire_slo_alert_firing", avail)] == 0.0
    assert values[("batchwire_slo_objective", (("model", "digits"), ("sli", "latency")))] == 0.99
    burn = values[("batchwire_slo_burn_rate", (("model", "digits"), ("sli", "latency"),
                                                ("window", "0.5s")))]  # fmt: skip
    assert burn == pytest.approx(100.0)


@pytest.fixture
def slo_endpoint(monitor: SloMonitor, clock: Clock) -> Iterator[str]:
    traffic(monitor, clock, 1, latency_s=SLOW_S)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            body = json.dumps(monitor.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_slo_command_prints_objective_percentiles_budget_and_alerts(
    slo_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["slo", "--url", slo_endpoint]) == 0
    out = capsys.readouterr().out
    assert "digits: 99% of requests under 50 ms" in out
    assert "p99 " in out and "budget left" in out
    assert "FIRING page latency 14.4x/5s/0.5s" in out
    assert main(["slo", "--url", slo_endpoint, "--json"]) == 0
    assert "digits" in json.loads(capsys.readouterr().out)


def test_slo_command_fails_clearly_when_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["slo", "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot read http://127.0.0.1:9/slo" in capsys.readouterr().err


def test_render_without_models() -> None:
    assert "no model has an SLO" in render({})
