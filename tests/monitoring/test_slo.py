"""The SLO monitor with a fake clock: burn-rate math, multiwindow alerts, feeds, outputs."""

from __future__ import annotations

import http.server
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchwire.cli import main
from batchwire.config import BurnRateAlertConfig, SloConfig
from monitoring import spans as S
from monitoring.slo import (
    MAX_BUCKETS,
    SloCollector,
    SloMonitor,
    SloSpanProcessor,
    burn_rate,
    rule_label,
)
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
    pattern: Callable[[int], tuple[float, str]] | None = None,
    checks_hz: int = 10,
) -> list[list[str]]:
    """Requests at a steady rate (`pattern(i)` -> (latency, status) of the i-th, else all
    alike); evaluates `checks_hz` times a second; returns what fired at each check."""
    fired = []
    for i in range(int(seconds * rate_hz)):
        clock.now += 1 / rate_hz
        latency, code = (latency_s, status) if pattern is None else pattern(i)
        monitor.record("digits", latency, code)
        if i % (rate_hz // checks_hz) == 0:
            fired.append(sorted(a.rule for a in monitor.evaluate()))
    return fired


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
    fired = traffic(monitor, clock, 1.0, latency_s=SLOW_S)  # checks 0.005 s + k x 0.1 s in
    first = next(k for k, rules in enumerate(fired) if fast_page in rules)
    # All requests slow: 100x in the short window at once, but the long (5 s) window must
    # exceed 14.4x too, i.e. hold > 14.4% slow requests: after ~0.72 s of slow traffic.
    assert first in (7, 8)
    assert all(r.sli == "latency" for r in monitor.firing())
    recovered = traffic(monitor, clock, 0.8)
    # Fast again: the page resolves once the short (0.5 s) window holds <= 14.4% slow
    # requests (after ~0.43 s), while the long window still burns at ~20x.
    resolved = next(k for k, rules in enumerate(recovered) if fast_page not in rules)
    assert resolved in (4, 5)
    assert monitor.burn_rates("digits")["latency"][5.0] > 14.4
    assert all(fast_page not in rules for rules in recovered[resolved:])
    events = [json.loads(r.getMessage()) for r in caplog.records]
    page = [e for e in events if e["rule"] == fast_page]
    assert [e["state"] for e in page] == ["firing", "resolved"]  # once per transition
    assert page[0]["burn_rate_short"] > 14.4 and page[0]["sli"] == "latency"
    assert page[0]["event"] == "slo_alert" and page[0]["severity"] == "page"
    firing_record = next(r for r in caplog.records if json.loads(r.getMessage()) == page[0])
    assert firing_record.levelno == logging.WARNING
    assert firing_record.slo_event == page[0]  # type: ignore[attr-defined]


def test_in_budget_noise_fires_nothing_over_every_window(monitor: SloMonitor, clock: Clock) -> None:
    # 0.5% slow and 0.04% failing: half the budget of each SLI, for longer than the
    # longest (360 s) window. A lone failure burns 100x in the short window; the long
    # window keeps it from paging.
    def noise(i: int) -> tuple[float, str]:
        if i % 2500 == 1250:
            return FAST_S, "INTERNAL"
        return (SLOW_S if i % 200 == 100 else FAST_S), "OK"

    fired = traffic(monitor, clock, 400, rate_hz=20, pattern=noise, checks_hz=1)
    assert not any(fired)
    slis = monitor.snapshot()["digits"]["slis"]
    assert slis["latency"]["budget_remaining"] == pytest.approx(0.5, abs=0.02)
    assert slis["availability"]["budget_remaining"] == pytest.approx(0.6, abs=0.15)
    monitor.record("digits", FAST_S, "INTERNAL")
    assert monitor.burn_rates("digits")["availability"][0.5] > 14.4  # one failure in ~10
    assert monitor.evaluate() == []


def test_a_moderate_burn_fires_the_slow_page_and_ticket_not_the_fast_page(
    monitor: SloMonitor, clock: Clock
) -> None:
    traffic(monitor, clock, 40, rate_hz=100)
    # 8% slow: 8x the budget. 14.4x never; 1x over 360 s once slow/total > 1% (~5.7 s);
    # 6x over 30 s once the 30 s window holds > 6% slow requests (after ~22.5 s).
    fired = traffic(
        monitor,
        clock,
        30,
        rate_hz=100,
        pattern=lambda i: (SLOW_S if i % 25 in (0, 12) else FAST_S, "OK"),
    )
    fast_page, slow_page, ticket = (rule_label(r) for r in shrunk().alerts)
    assert not any(fast_page in rules for rules in fired)
    first_ticket = next(k for k, rules in enumerate(fired) if ticket in rules) / 10
    first_slow_page = next(k for k, rules in enumerate(fired) if slow_page in rules) / 10
    assert 5.0 <= first_ticket <= 6.5
    assert 22.0 <= first_slow_page <= 23.5


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


def test_late_records_land_in_their_bucket_and_ancient_ones_are_dropped(
    monitor: SloMonitor, clock: Clock
) -> None:
    traffic(monitor, clock, 1)
    before = monitor.snapshot()["digits"]["slis"]["latency"]["events"]
    monitor.record("digits", SLOW_S, "OK", now_s=clock.now - 1.0)  # 1 s late: in the 2.5 s
    monitor.record("digits", SLOW_S, "OK", now_s=clock.now - 1000)  # older than the ring
    rates = monitor.burn_rates("digits")["latency"]
    assert rates[0.5] == 0.0 and rates[2.5] > 0.0
    state = monitor.snapshot()["digits"]
    assert state["slis"]["latency"]["events"] == before + 1
    assert state["recent"]["latency_ms"]["p99"] == pytest.approx(FAST_S * 1000, rel=0.1)


def test_percentiles_come_from_the_recent_histogram(monitor: SloMonitor, clock: Clock) -> None:
    for i in range(1000):  # within 0.4 s: inside the 0.5 s percentile window
        clock.now += 0.0004
        monitor.record("digits", 0.1 if i % 100 == 0 else 0.01 if i % 10 == 0 else 0.001, "OK")
    recent = monitor.snapshot()["digits"]["recent"]
    assert recent["requests"] == 1000 and recent["window"] == "0.5s"
    latency = recent["latency_ms"]  # bins are 10% wide: a percentile is at most 10% high
    assert 1.0 <= latency["p50"] <= 1.1
    assert 1.0 <= latency["p90"] <= 1.1  # 900 of 1000 took 1 ms
    assert 10.0 <= latency["p99"] <= 11.0
    clock.now += 1.0  # the window moves on
    assert monitor.snapshot()["digits"]["recent"]["latency_ms"]["p50"] is None


def test_rings_are_bounded_whatever_the_traffic(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    wide = SloConfig(
        latency_threshold_ms=50,
        alerts=[rule("page", 14.4, long_s=259200, short_s=1)],  # 3 d at 0.1 s: too many
    )
    monitor = SloMonitor({"digits": SloConfig(latency_threshold_ms=50), "wide": wide}, clock=clock)
    assert "need more than" in caplog.text
    default = monitor._models["digits"]
    assert default.bucket_s == 30 and default.size == 259200 // 30 + 1
    assert monitor._models["wide"].size <= MAX_BUCKETS + 1
    traffic(monitor, clock, 20, rate_hz=1000)
    assert len(default.ok) == len(default.slow) == len(default.failed) == default.size
    assert len(default.hist) == default.hist_size == 11
    assert monitor.snapshot()["digits"]["slis"]["latency"]["events"] == 20000


def test_record_evaluate_and_reload_are_safe_from_several_threads(
    monitor: SloMonitor, clock: Clock
) -> None:
    small = SloConfig(latency_threshold_ms=50, alerts=[rule("page", 14.4, long_s=5, short_s=0.5)])
    feeders, each = 4, 5000
    errors: list[BaseException] = []

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        return run

    def feed() -> None:
        for i in range(each):
            monitor.record("digits", FAST_S if i % 2 else SLOW_S, "OK")

    def read() -> None:
        for _ in range(30):
            monitor.evaluate()
            monitor.snapshot()

    def reload() -> None:  # models come and go while others are evaluated
        for i in range(60):
            monitor.set_objective(f"m{i % 20}", small if i < 40 else None)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often
    try:
        workers = [threading.Thread(target=guarded(feed)) for _ in range(feeders)]
        workers += [
            threading.Thread(target=guarded(read)),
            threading.Thread(target=guarded(reload)),
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    latency = monitor.snapshot()["digits"]["slis"]["latency"]
    assert latency["events"] == feeders * each and latency["bad_events"] == feeders * each // 2
    assert monitor.models() == ["digits"]


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


def test_the_tracers_bulk_feed_counts_as_one_request_at_a_time(clock: Clock) -> None:
    """`on_requests_end` (the tracer's fast paths, a chunk at a time) counts what
    `on_request_end` of each request counts."""
    bulk = SloMonitor({"digits": shrunk()}, clock=clock)
    single = SloMonitor({"digits": shrunk()}, clock=clock)
    models = ["digits", "other", "digits", "digits", "digits"]
    statuses = ["OK", "OK", "INTERNAL", "OK", "INVALID_ARGUMENT"]
    durations_ns = [int(FAST_S * 1e9), 1, int(FAST_S * 1e9), int(SLOW_S * 1e9), 1]
    SloSpanProcessor(bulk).on_requests_end(models, statuses, durations_ns)
    one = SloSpanProcessor(single)
    for request in zip(models, statuses, durations_ns, strict=True):
        one.on_request_end(*request)
    slis = bulk.snapshot()["digits"]["slis"]
    assert slis == single.snapshot()["digits"]["slis"]
    assert slis["availability"]["events"] == 3 and slis["availability"]["bad_events"] == 1
    assert slis["latency"]["events"] == 2 and slis["latency"]["bad_events"] == 1


@pytest.mark.parametrize("injected_clock", [False, True])
def test_the_front_doors_feeds_count_what_record_counts(injected_clock: bool) -> None:
    """`ok_feeds` (an array append of a successful request's latency; the front door
    `record`s the others) counts as `record` does; with an injected clock it is `record`
    on that clock."""
    clock = Clock() if injected_clock else None
    fed = SloMonitor({"digits": shrunk()}, **({"clock": clock} if clock else {}))
    recorded = SloMonitor({"digits": shrunk()}, **({"clock": clock} if clock else {}))
    now = time.monotonic_ns()
    requests = [
        ("digits", "OK", now - int(FAST_S * 1e9), now),
        ("digits", "OK", now - int(SLOW_S * 1e9), now),
        ("digits", "INTERNAL", now - 1_000, now),
        ("other", "OK", now - 1_000, now),
        ("digits", "INVALID_ARGUMENT", now - 1_000, now),
    ]
    for model, _, start_ns, end_ns in requests[:2] * 2:  # the successes, twice each
        fed.ok_feeds[model](end_ns - start_ns)
    for model, status, start_ns, end_ns in requests[2:]:  # as the front door does
        fed.record(model, (end_ns - start_ns) / 1e9, status)
    requests.extend(requests[:2])
    for model, status, start_ns, end_ns in requests:
        recorded.record(model, (end_ns - start_ns) / 1e9, status)
    slis = fed.snapshot()["digits"]["slis"]
    assert slis == recorded.snapshot()["digits"]["slis"]
    assert slis["availability"]["events"] == 5 and slis["availability"]["bad_events"] == 1
    assert slis["latency"]["events"] == 4 and slis["latency"]["bad_events"] == 2
    assert set(fed.ok_feeds) == {"digits"}
    fed.ok_feeds["other"](1_000)  # a model without an objective: not counted
    fed.ok_feeds["digits"](int(FAST_S * 1e9))  # counted once, at the next read
    assert fed.snapshot()["digits"]["slis"]["latency"]["events"] == 5
    assert fed.snapshot()["digits"]["slis"]["latency"]["events"] == 5
    if not injected_clock:
        assert len(fed._ok_ns["digits"]) == 0  # taken by the reads


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
    p99 = values[("batchwire_slo_latency_seconds", (("model", "digits"), ("quantile", "0.99")))]
    assert SLOW_S <= p99 <= SLOW_S * 1.1
    budget = values[("batchwire_slo_error_budget_remaining", (("model", "digits"),
                                                             ("sli", "latency")))]  # fmt: skip
    assert budget == pytest.approx(1 - 200 / 200 / 0.01)  # 1 s of slow traffic, overspent


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
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
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


def _count_one(windows: Any, latency_s: float, status: str, now_s: float) -> None:
    """The reference: one record counted on arrival (the ring moves to its bucket; older
    than the ring, it is dropped; the latency histogram keeps its last buckets)."""
    from bisect import bisect_left

    from monitoring.slo import _LATENCY_BOUNDS_S, SERVER_FAILURES

    if status != "OK" and status not in SERVER_FAILURES:
        return
    index = int(now_s / windows.bucket_s)
    if index > windows.current:
        windows.advance(index)
    elif index <= windows.current - windows.size:
        return
    slot = index % windows.size
    if status != "OK":
        windows.failed[slot] += 1
        return
    windows.ok[slot] += 1
    windows.slow[slot] += latency_s > windows.threshold_s
    if index > windows.current - windows.hist_size:
        windows.hist[index % windows.hist_size][bisect_left(_LATENCY_BOUNDS_S, latency_s)] += 1


def test_records_counted_in_one_batch_count_as_one_at_a_time() -> None:
    """`record` only queues; the batch count (`_fold`, numpy) must leave every bucket,
    histogram row and the ring's position exactly as counting each record on arrival."""
    import random

    from monitoring.slo import _ModelWindows

    rng = random.Random(5)
    statuses = ["OK"] * 8 + ["INTERNAL", "UNAVAILABLE", "INVALID_ARGUMENT", "CANCELLED"]
    objectives = {"digits": shrunk(), "other": shrunk()}
    reference = {name: _ModelWindows(name, slo, 1000.0) for name, slo in objectives.items()}
    batched = SloMonitor(objectives, clock=Clock())
    now = 1000.0
    seen = [0, 0, 0]  # ok, failed and histogram counts at the checkpoints
    for i in range(1, 5001):
        # Time goes forward, now and then past the whole ring (7,201 buckets of 50 ms);
        # some records are late: around the edge of the latency histogram (11 buckets),
        # within the ring, or around its edge.
        now += 400.0 if rng.random() < 0.002 else rng.choice([0.0, 0.01, 0.02, 0.3])
        late = rng.choice([(0, 0), (-0.7, -0.4), (-40, -1), (-360.2, -359.9)])
        at = now + rng.uniform(*late) if rng.random() < 0.3 else now
        model = rng.choice(["digits", "digits", "other", "unmonitored"])
        latency, status = rng.lognormvariate(-4, 1.5), rng.choice(statuses)
        batched.record(model, latency, status, now_s=at)
        if model in reference:
            _count_one(reference[model], latency, status, at)
        if i % 250 == 0:  # a checkpoint: count what is pending (a past `now` moves nothing)
            batched.burn_rates("digits", now_s=-1.0)
            for model, a in reference.items():
                b = batched._models[model]
                assert (a.current, a.ok, a.slow, a.failed, a.hist) == (
                    b.current, b.ok, b.slow, b.failed, b.hist
                )  # fmt: skip
                seen[0] += sum(a.ok)
                seen[1] += sum(a.failed)
                seen[2] += sum(map(sum, a.hist))
    assert all(seen)
