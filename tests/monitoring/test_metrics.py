"""Prometheus metrics read from a real runtime's counters, and the metrics HTTP endpoint."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchwire.errors import InferenceError
from batchwire.types import InferRequest
from monitoring.metrics import MetricsServer, RuntimeCollector, batch_size_buckets
from server.runtime import ModelRuntime

pytestmark = [pytest.mark.timeout(120)]


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset({"model": "digits", "version": "1", **labels}.items())


@pytest.mark.asyncio
async def test_counters_histograms_and_rejections_match_what_ran(digits_repository: Path) -> None:
    runtime = ModelRuntime(digits_repository)
    await runtime.start()
    try:
        good = [np.random.default_rng(i).random((2, 1, 8, 8), np.float32) * 16 for i in range(5)]
        for images in good:
            await runtime.infer("digits", "", InferRequest(inputs={"INPUT": images}))
        for bad in (np.zeros((1, 1, 16, 16), np.float32), np.zeros((1, 1, 8, 8), np.float64)):
            with pytest.raises(InferenceError):
                await runtime.infer("digits", "", InferRequest(inputs={"INPUT": bad}))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RuntimeCollector(runtime))
        values = samples(registry)
    finally:
        await runtime.close()
    assert values[key("nv_inference_request_success")] == 5
    assert values[key("batchwire_requests_total", status="OK")] == 5
    assert values[key("batchwire_requests_total", status="INVALID_ARGUMENT")] == 2
    assert values[key("batchwire_rejected_inputs_total", reason="shape")] == 1
    assert values[key("batchwire_rejected_inputs_total", reason="datatype")] == 1
    assert values[key("nv_inference_request_failure", reason="OTHER")] == 2
    assert values[key("nv_inference_count")] == 10  # samples
    executions = values[key("nv_inference_exec_count")]
    assert 1 <= executions <= 5
    assert values[key("batchwire_request_duration_seconds_count")] == 5
    assert values[key("batchwire_request_duration_seconds_bucket", le="+Inf")] == 5
    assert values[key("batchwire_batch_size_count")] == executions
    assert values[key("batchwire_batch_size_sum")] == 10
    assert values[key("batchwire_queue_duration_seconds_count")] == 5
    assert values[key("batchwire_compute_duration_seconds_count")] == executions
    assert values[key("batchwire_lane_requests_total", lane="batched")] == 5
    assert values[key("batchwire_queue_depth")] == 0


def test_batch_size_buckets_cover_the_largest_batch() -> None:
    assert batch_size_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_size_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_size_buckets(0) == [1]


def test_endpoint_serves_metrics_and_json_routes() -> None:
    registry = CollectorRegistry(auto_describe=False)
    server = MetricsServer(registry, {"/slo": lambda: {"digits": {"ok": True}}}, "127.0.0.1", 0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/slo", timeout=10) as response:
            assert json.loads(response.read()) == {"digits": {"ok": True}}
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/nope", timeout=10)
        assert err.value.code == 404
    finally:
        server.stop()
