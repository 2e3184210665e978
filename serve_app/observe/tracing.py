"""OpenTelemetry traces for the router: one span tree per request.

    spillway.request            (SERVER; parent: the client's traceparent, if any)
    ├── spillway.classify       declared and final data class, detectors that raised it
    ├── spillway.admission      one per placement attempt: queue wait, site, spill reason
    └── spillway.generate       engine call: site, replica, TTFT, tokens
        └── llm_request         vLLM's own span (OTLP exporters only; joined through traceparent)

Spans carry model, tenant, data class, site, replica, queue wait, spill reason,
TTFT and token counts; never prompt or completion text unless
``tracing.record_content`` is set. With ``exporter: none`` a ``RequestTrace``
is a no-op that costs one attribute check per call.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from serve_app.config import TracingConfig

TRACE_HEADERS = ("traceparent", "tracestate")
CONTENT_ATTRIBUTE_MAX_CHARS = 8_192
MEMORY_EXPORTER_MAX_SPANS = 2_000


class _BoundedMemoryExporter:
    """Keeps the latest finished spans in memory (for tests and debugging), bounded."""

    def __init__(self, max_spans: int = MEMORY_EXPORTER_MAX_SPANS):
        self._spans: deque = deque(maxlen=max_spans)

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        self._spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        self._spans.clear()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def finished_spans(self) -> list[dict[str, Any]]:
        return [span_as_dict(span) for span in self._spans]


def span_as_dict(span) -> dict[str, Any]:
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
    }


def _exporter(config: TracingConfig):
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if config.exporter == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint)
    if config.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint, insecure=not config.endpoint.startswith("https"))
    if config.exporter == "memory":
        return _BoundedMemoryExporter()
    raise ValueError(f"unknown tracing exporter {config.exporter!r}")


class Tracing:
    """The router's tracer: its own provider (never the process-global one, which Ray or vLLM
    may own), a parent-based ratio sampler, and a batching processor."""

    def __init__(self, config: TracingConfig, component: str = "router", exporter=None):
        self.config = config
        self.memory: _BoundedMemoryExporter | None = None
        self._tracer = None
        if config.exporter == "none" and exporter is None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        exporter = exporter or _exporter(config)
        if isinstance(exporter, _BoundedMemoryExporter):
            self.memory = exporter
        provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name, "spillway.component": component}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        if config.exporter in ("otlp-http", "otlp-grpc"):
            processor = BatchSpanProcessor(exporter, schedule_delay_millis=config.export_interval_ms)
        else:
            # Console and memory: spans are visible the moment they end.
            processor = SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
        self._provider = provider
        self._tracer = provider.get_tracer("spillway.router")
        self._propagator = TraceContextTextMapPropagator()

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start_request(self, headers: Mapping[str, str], attributes: dict[str, Any]) -> "RequestTrace":
        if self._tracer is None:
            return NO_TRACE
        from opentelemetry.trace import SpanKind

        carrier = {name: headers[name] for name in TRACE_HEADERS if name in headers}
        parent = self._propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span("spillway.request", context=parent, kind=SpanKind.SERVER,
                                       attributes=attributes)
        return RequestTrace(self, span)

    def shutdown(self) -> None:
        if self._tracer is not None:
            self._provider.shutdown()


class RequestTrace:
    """Spans of one request. ``child`` opens a span under the request span; ``generation``
    returns the engine span and the traceparent headers that make vLLM's span its child."""

    def __init__(self, tracing: Tracing | None, span):
        self._tracing = tracing
        self.span = span
        self._generation = None

    @property
    def recording(self) -> bool:
        return self.span is not None and self.span.is_recording()

    def set(self, **attributes: Any) -> None:
        if self.span is not None:
            self.span.set_attributes({f"spillway.{k}": v for k, v in attributes.items() if v is not None})

    def record_content(self, name: str, text: str) -> None:
        if self.span is not None and self._tracing.config.record_content and text:
            self.span.set_attribute(name, text[:CONTENT_ATTRIBUTE_MAX_CHARS])

    @contextmanager
    def child(self, name: str, **attributes: Any) -> Iterator[Any]:
        if self.span is None:
            yield None
            return
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        span = self._tracing._tracer.start_span(
            name, context=set_span_in_context(self.span),
            attributes={f"spillway.{k}": v for k, v in attributes.items() if v is not None},
        )
        try:
            yield span
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def start_generation(self, **attributes: Any) -> dict[str, str] | None:
        """Open the engine span; returns the trace headers to hand to the engine (None if untraced)."""
        if self.span is None:
            return None
        from opentelemetry.trace import set_span_in_context

        self.end_generation(outcome="retried")
        context = set_span_in_context(self.span)
        self._generation = self._tracing._tracer.start_span(
            "spillway.generate", context=context,
            attributes={f"spillway.{k}": v for k, v in attributes.items() if v is not None},
        )
        if not self._generation.is_recording():
            return None
        headers: dict[str, str] = {}
        self._tracing._propagator.inject(headers, context=set_span_in_context(self._generation))
        return headers

    def set_generation(self, **attributes: Any) -> None:
        if self._generation is not None:
            self._generation.set_attributes({f"spillway.{k}": v for k, v in attributes.items() if v is not None})

    def end_generation(self, **attributes: Any) -> None:
        if self._generation is not None:
            self.set_generation(**attributes)
            self._generation.end()
            self._generation = None

    def finish(self, outcome: str, status_code: int, **attributes: Any) -> None:
        if self.span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self.end_generation(outcome=outcome)
        self.set(outcome=outcome, **attributes)
        self.span.set_attribute("http.response.status_code", status_code)
        if status_code >= 500 or outcome == "stream_failed":
            self.span.set_status(Status(StatusCode.ERROR, outcome))
        self.span.end()
        self.span = None


NO_TRACE = RequestTrace(None, None)
