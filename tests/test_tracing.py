"""The router's span helpers with the SDK's in-memory exporter: tree shape, parent from an incoming
traceparent, the sampler ratio, the content flag, and trace headers handed to the engine."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serve_app.config import TracingConfig
from serve_app.observe.tracing import NO_TRACE, Tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def _tracing(**overrides):
    exporter = InMemorySpanExporter()
    config = TracingConfig(exporter="console", sample_ratio=1.0, **overrides)
    return Tracing(config, exporter=exporter), exporter


def _one_request(tracing, headers=None):
    trace = tracing.start_request(headers or {}, {"spillway.tenant": "t1"})
    with trace.child("spillway.classify", data_class="public"):
        pass
    with trace.child("spillway.admission", attempt=1):
        pass
    engine_headers = trace.start_generation(site="onprem")
    trace.record_content("gen_ai.prompt", "the prompt text")
    trace.finish("ok", 200, ttft_ms=12.5, output_tokens=3)
    return engine_headers


def test_span_tree_and_attributes():
    tracing, exporter = _tracing()
    _one_request(tracing)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"spillway.request", "spillway.classify", "spillway.admission", "spillway.generate"}
    root = spans["spillway.request"]
    assert root.parent is None
    for name in ("spillway.classify", "spillway.admission", "spillway.generate"):
        assert spans[name].parent.span_id == root.context.span_id
        assert spans[name].context.trace_id == root.context.trace_id
    assert root.attributes["spillway.tenant"] == "t1"
    assert root.attributes["spillway.ttft_ms"] == 12.5
    assert root.attributes["spillway.output_tokens"] == 3
    assert root.attributes["http.response.status_code"] == 200
    assert spans["spillway.generate"].attributes["spillway.outcome"] == "ok"
    assert "gen_ai.prompt" not in root.attributes  # record_content is off by default


def test_incoming_traceparent_is_the_parent_and_engine_gets_the_generation_span():
    tracing, exporter = _tracing()
    engine_headers = _one_request(tracing, {"traceparent": f"00-{TRACE_ID}-{PARENT}-01"})
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["spillway.request"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == PARENT
    generate = spans["spillway.generate"]
    assert engine_headers["traceparent"] == f"00-{TRACE_ID}-{generate.context.span_id:016x}-01"


def test_sample_ratio_zero_records_nothing_and_passes_no_headers():
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingConfig(exporter="console", sample_ratio=0.0), exporter=exporter)
    assert _one_request(tracing) is None
    assert exporter.get_finished_spans() == ()


def test_sampled_parent_wins_over_ratio_zero():
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingConfig(exporter="console", sample_ratio=0.0), exporter=exporter)
    _one_request(tracing, {"traceparent": f"00-{TRACE_ID}-{PARENT}-01"})
    assert len(exporter.get_finished_spans()) == 4


def test_record_content_flag_puts_prompt_on_the_span():
    tracing, exporter = _tracing(record_content=True)
    _one_request(tracing)
    root = next(s for s in exporter.get_finished_spans() if s.name == "spillway.request")
    assert root.attributes["gen_ai.prompt"] == "the prompt text"


def test_retry_closes_the_previous_generation_span():
    tracing, exporter = _tracing()
    trace = tracing.start_request({}, {})
    trace.start_generation(site="onprem", attempt=1)
    trace.start_generation(site="cloud", attempt=2)
    trace.finish("ok", 200)
    generations = [s for s in exporter.get_finished_spans() if s.name == "spillway.generate"]
    assert [g.attributes["spillway.outcome"] for g in generations] == ["retried", "ok"]


def test_failure_status_and_no_op_when_off():
    tracing, exporter = _tracing()
    tracing.start_request({}, {}).finish("stream_failed", 200)
    assert exporter.get_finished_spans()[0].status.status_code.name == "ERROR"
    off = Tracing(TracingConfig())
    assert not off.enabled
    trace = off.start_request({"traceparent": f"00-{TRACE_ID}-{PARENT}-01"}, {})
    assert trace is NO_TRACE and trace.start_generation() is None
    trace.finish("ok", 200)


def test_otlp_exporter_needs_an_endpoint():
    with pytest.raises(ValueError, match="needs tracing.endpoint"):
        TracingConfig(exporter="otlp-grpc")
    assert TracingConfig(exporter="otlp-http", endpoint="http://c:4318/v1/traces").engine_otlp_protocol == "http/protobuf"
    assert TracingConfig(exporter="otlp-grpc", endpoint="c:4317").engine_otlp_endpoint == "c:4317"
    assert TracingConfig(exporter="memory").engine_otlp_endpoint is None
