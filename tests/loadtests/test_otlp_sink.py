"""The OTLP sink keeps flattened spans, or (for benchmarks) only counts them."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts

from loadtests.otlp_sink import _Store, _TraceService


def export_request(names: list[str]) -> ts.ExportTraceServiceRequest:
    request = ts.ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    for i, name in enumerate(names):
        span = scope_spans.spans.add(name=name, trace_id=bytes(16), span_id=bytes([i + 1]) * 8)
        span.attributes.add(key="k").value.int_value = i
    return request


@pytest.mark.parametrize("keep", [True, False])
def test_the_sink_counts_every_span_and_keeps_them_when_asked(keep: bool) -> None:
    store = _Store(keep=keep)
    service = _TraceService(store)
    service.Export(export_request(["a", "b", "c"]), None)  # type: ignore[arg-type]
    service.Export(export_request(["d"]), None)  # type: ignore[arg-type]
    assert store.requests == 2 and store.counted == 4
    if keep:
        assert [s["name"] for s in store.spans] == ["a", "b", "c", "d"]
        assert store.spans[2]["attributes"] == {"k": 2}
    else:
        assert store.spans == []  # counted, not kept
