"""The Router deployment: Spillway's OpenAI-compatible front door (a FastAPI ingress).

Per request it checks the body (size, JSON, model), picks an engine deployment
through the placement, dispatches with a Ray Serve streaming call and relays
what the engine produced. Engine SSE events pass through as they are, never
re-encoded. Errors are ``SpillwayError``s, turned into OpenAI-format bodies in
one place (``_error_response``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.engine import ENDPOINT_CHAT, ENDPOINT_COMPLETIONS
from serve_app.config import SpillwayConfig
from serve_app.errors import (
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    SpillwayError,
    error_body,
)
from serve_app.policy.classify import HEADER_DATA_CLASS, Classifier, DataClass, request_texts
from serve_app.policy.pipeline import RequestView
from serve_app.policy.splits import TrafficSplit, Variant
from serve_app.router.gates import EngineStream, GateDirectory, GateUnavailable
from serve_app.router.placement import EngineTarget, build_schedulers, build_targets
from serve_app.router.metrics import RouterMetrics
from serve_app.router.scheduler import ModelScheduler
from serve_app.tracing import NO_TRACE, RequestTrace, Tracing

logger = logging.getLogger("spillway.router")

HEADER_REQUEST_ID = "x-request-id"
HEADER_SITE = "x-spillway-site"
HEADER_MODEL = "x-spillway-model"
SSE_MEDIA_TYPE = "text/event-stream"
HEADER_DATA_CLASS_OUT = "x-spillway-data-class"
HEADER_SPILL_REASON = "x-spillway-spill-reason"
HEADER_QUEUE_MS = "x-spillway-queue-ms"
HEADER_PRIORITY = "x-spillway-priority"
HEADER_SESSION = "x-session-id"
HEADER_VARIANT = "x-spillway-variant"
HEADER_ROUTING_MODE = "x-spillway-routing"
HEADER_TENANT = "x-spillway-tenant"
ROUTING_POW2 = "pow2"
ROUTING_ONPREM_ONLY = "onprem-only"
PRIORITY_RANGE = (-10, 10)
RETRY_PRIORITY_BOOST = 1_000
RETRY_AFTER_UNAVAILABLE_S = 5
HEALTH_PROBE_TIMEOUT_S = 5.0
GATE_REFRESH_S = 2.0

api = FastAPI(title="Spillway", docs_url=None, redoc_url=None, openapi_url=None)


def _router_headers(request: Request) -> dict[str, str]:
    """Answers the router gives itself (errors, /v1/models, /health) were served at the router's site."""
    site = getattr(request.app.state, "router_site", None)
    return {HEADER_SITE: site} if site else {}


def _error_response(exc: SpillwayError, request: Request) -> JSONResponse:
    headers = _router_headers(request)
    if exc.retry_after_s is not None:
        headers["retry-after"] = str(max(1, int(round(exc.retry_after_s))))
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(SpillwayError)
async def _spillway_error(request: Request, exc: SpillwayError):
    return _error_response(exc, request)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    message = "route not found" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse(
        error_body(message, "invalid_request_error", exc.status_code), status_code=exc.status_code,
        headers=_router_headers(request),
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse(
        error_body(f"invalid request: {exc.errors()}", "invalid_request_error", 400), status_code=400,
        headers=_router_headers(request),
    )


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception):
    logger.exception("unexpected error on %s", request.url.path)
    body = error_body("internal error in the Spillway router; see its logs", "internal_error", 500)
    return JSONResponse(body, status_code=500, headers=_router_headers(request))


def _is_dispatch_failure(exc: BaseException) -> bool:
    """True for failures that mean 'this site could not run the request' (try another)."""
    import ray.exceptions

    return isinstance(exc, (ray.exceptions.RayError, asyncio.TimeoutError, OSError))


_USAGE_KEY = '"usage":'
_JSON_DECODER = json.JSONDecoder()


def _usage(payload: str | None) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from a JSON body or an SSE usage event, parsing only
    the usage object (bodies can be large); None when there is none."""
    if not payload:
        return None
    at = payload.rfind(_USAGE_KEY)
    if at < 0:
        return None
    try:
        usage, _ = _JSON_DECODER.raw_decode(payload, at + len(_USAGE_KEY))
    except ValueError:
        return None
    if not isinstance(usage, dict):
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


_USAGE_ONLY_MARK = b'"choices":[]'
_USAGE_KEY_BYTES = _USAGE_KEY.encode()


def _is_usage_only_event(event: str) -> bool:
    """The final usage chunk of a stream (``"choices":[]`` plus usage), as vLLM writes it."""
    return '"choices":[]' in event and _USAGE_KEY in event


def _tenant(request: Request) -> str:
    """Tenant label for traces: the x-spillway-tenant header, else a fingerprint of the API key
    (never the key itself), else 'anonymous'."""
    tenant = request.headers.get(HEADER_TENANT)
    if tenant:
        return tenant[:64]
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and len(auth) > 7:
        return "key-" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:12]
    return "anonymous"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _usage_attributes(usage: tuple[int, int] | None) -> dict[str, int]:
    if usage is None:
        return {}
    return {"input_tokens": usage[0], "output_tokens": usage[1]}


def _finite_or_none(value: float) -> float | None:
    return round(value, 1) if math.isfinite(value) else None


def _parse_priority(value: str | None) -> int:
    if value is None or value == "":
        return 0
    try:
        priority = int(value)
    except ValueError:
        priority = None
    low, high = PRIORITY_RANGE
    if priority is None or not low <= priority <= high:
        raise InvalidRequest(f"{HEADER_PRIORITY} must be an integer from {low} to {high}", param=HEADER_PRIORITY)
    return priority


@dataclass
class StreamSummary:
    """What the relay saw of one stream, for metrics, spans and split counters."""

    first_at: float | None = None
    last_at: float | None = None
    events: int = 0
    usage: tuple[int, int] | None = None
    failed: bool = False

    def itl_ms(self) -> float | None:
        tokens = (self.usage[1] if self.usage else self.events)
        if self.first_at is None or self.last_at is None or tokens < 2:
            return None
        return (self.last_at - self.first_at) * 1000 / (tokens - 1)


class _RelayBase:
    """An iterable response body that reports how its stream ended (``on_finish``) exactly once,
    however it ends: finished, engine failure, client disconnect, or never started at all.

    The router always asks the engine for the final usage event (token counts for metrics and
    cost); ``strip_usage`` drops it again when the client did not ask for it."""

    def __init__(self, source, request_id: str, on_finish, strip_usage: bool = False):
        self._source = source
        self._request_id = request_id
        self._on_finish = on_finish
        self._strip_usage = strip_usage
        self._done = False
        self._iterator = self._run()

    def __aiter__(self):
        return self._iterator

    def _run(self):
        raise NotImplementedError

    def _finish(self, summary: StreamSummary) -> None:
        if not self._done:
            self._done = True
            self._on_finish(summary)


class _Relay(_RelayBase):
    """Streams the events of a Ray Serve streaming call (the pow2 baseline's path) untouched; on
    engine failure the client gets an explicit error event, never a silent truncation; on client
    disconnect the engine request is cancelled."""

    async def _run(self) -> AsyncIterator[str]:
        summary = StreamSummary()
        finished = False
        try:
            async for event in self._source:
                now = time.monotonic()
                if summary.first_at is None:
                    summary.first_at = now
                if event.startswith("data: {"):
                    if _is_usage_only_event(event):
                        summary.usage = _usage(event)
                        if self._strip_usage:
                            continue
                    else:
                        summary.events += 1
                        summary.last_at = now
                yield event
            finished = True
        except Exception as exc:  # noqa: BLE001 - the client must see an error, never a silent truncation
            logger.warning("request %s: engine failed mid-stream: %r", self._request_id, exc)
            body = error_body("the engine failed while streaming; the response is incomplete", "engine_error", 502)
            yield f"data: {json.dumps(body)}\n\n"
            finished = summary.failed = True
        finally:
            if not finished:
                summary.failed = True
                self._source.cancel()
            self._finish(summary)

    def __del__(self):
        # A response that was never sent (client gone before the first byte) must not leak its slot.
        self._finish(StreamSummary(failed=True))


class _StreamRelay(_RelayBase):
    """Relays an engine's direct token stream (see deployments/stream_server.py) to the client.

    Bytes pass through as the socket delivers them: one read may hold several SSE events when the
    router is behind (coalescing only then, never on a timer). Only complete events are forwarded;
    a partial event waits for its end. The usage event is read for metrics and dropped when the
    client did not ask for it. A stream that ends without ``[DONE]`` ends with an explicit error
    event. However it ends, the connection is closed (the engine then aborts the request) and
    ``on_finish`` runs exactly once."""

    READ_BYTES = 1 << 16

    async def _run(self) -> AsyncIterator[bytes]:
        summary = StreamSummary()
        reader = self._source.reader
        pending = b""
        done_seen = False
        try:
            while True:
                try:
                    chunk = await reader.read(self.READ_BYTES)
                except (ConnectionError, OSError) as exc:
                    logger.warning("request %s: engine stream broke: %r", self._request_id, exc)
                    chunk = b""
                if not chunk:
                    break
                now = time.monotonic()
                data = pending + chunk
                cut = data.rfind(b"\n\n")
                if cut < 0:
                    pending = data
                    continue
                complete, pending = data[:cut + 2], data[cut + 2:]
                if summary.first_at is None:
                    summary.first_at = now
                if complete.endswith(b"data: [DONE]\n\n"):
                    done_seen = True
                if _USAGE_ONLY_MARK in complete:
                    complete = self._take_usage(complete, summary, now)
                else:
                    summary.last_at = now
                summary.events += complete.count(b"\n\n") - (1 if done_seen else 0)
                if complete:
                    yield complete
                if done_seen:
                    break  # a direct connection stays open for the next request
            if not done_seen:
                logger.warning("request %s: engine stream ended without [DONE]", self._request_id)
                body = error_body("the engine failed while streaming; the response is incomplete", "engine_error", 502)
                yield f"data: {json.dumps(body)}\n\n".encode()
                summary.failed = True
        except BaseException:
            summary.failed = True  # client gone (cancelled) or anything unexpected
            raise
        finally:
            self._source.close(reusable=done_seen and not pending and not summary.failed)
            self._finish(summary)

    def _take_usage(self, complete: bytes, summary: StreamSummary, now: float) -> bytes:
        kept = []
        for event in complete.split(b"\n\n")[:-1]:
            if _USAGE_ONLY_MARK in event and _USAGE_KEY_BYTES in event:
                summary.usage = _usage(event.decode())
                if self._strip_usage:
                    continue
            elif event.startswith(b"data: {"):
                summary.last_at = now
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def __del__(self):
        # A response that was never sent (client gone before the first byte) must not leak its slot.
        self._source.close()
        self._finish(StreamSummary(failed=True))


async def _connect_stream(reply: dict, call, timeout_s: float) -> EngineStream:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(reply["host"], reply["port"]),
                                                timeout=timeout_s)
    except BaseException:
        call.cancel()  # the engine closes the parked stream when its call is cancelled or it expires
        raise
    writer.write(reply["token"].encode("ascii") + b"\n")
    return EngineStream(reader, writer, call)


@serve.ingress(api)
class Router:
    """Front door for every model. Holds no global state: any replica can serve any request."""

    def __init__(self, config: dict, engines: dict[str, dict[str, Any]]):
        self._config = SpillwayConfig.model_validate(config)
        self._targets = build_targets(self._config, engines)
        self._schedulers = build_schedulers(self._config, self._targets)
        self._classifier = Classifier.from_names(self._config.router.pii_detectors)
        self._pow2_in_flight: Counter[str] = Counter()
        self._metrics = RouterMetrics()
        self._tracing = Tracing(self._config.tracing)
        self._load_poller: asyncio.Task | None = None
        self._gate_refresher: asyncio.Task | None = None
        self._gates: GateDirectory | None = None
        if self._config.router.direct_dispatch:
            self._gates = GateDirectory()
            for by_group in self._targets.values():
                for target in by_group.values():
                    self._gates.watch(target.handle.app_name, target.handle.deployment_name)
        self._replica_tag = uuid.uuid4().hex[:8]
        self._splits = {
            alias: TrafficSplit(alias, [Variant(model, weight) for model, weight in split.variants.items()])
            for alias, split in self._config.router.splits.items()
        }
        self._default_class = DataClass[self._config.router.default_data_class]
        self._created = int(time.time())
        self._site_headers = {HEADER_SITE: self._config.router_site.name}
        api.state.router_site = self._config.router_site.name

    # ---- endpoints -------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> Response:
        report = await self._engine_report()
        healthy = all(any(site["healthy"] for site in sites.values()) for sites in report.values())
        return JSONResponse(
            {"status": "ok" if healthy else "degraded", "models": report},
            status_code=200 if healthy else 503, headers=self._site_headers,
        )

    @api.get("/v1/models")
    async def list_models(self) -> Response:
        data = [
            {
                "id": model.id,
                "object": "model",
                "created": self._created,
                "owned_by": "spillway",
                "max_model_len": model.engine.max_model_len,
                "sites": sorted(site for site, n in model.replicas.items() if n > 0),
            }
            for model in self._config.models
        ]
        data += [
            {"id": alias, "object": "model", "created": self._created, "owned_by": "spillway",
             "variants": {v.model: v.weight for v in split.variants}}
            for alias, split in self._splits.items()
        ]
        return JSONResponse({"object": "list", "data": data}, headers=self._site_headers)

    @api.get("/v1/spillway/scheduler")
    async def scheduler_state(self) -> Response:
        """This router replica's view: queue length, slots in use per engine group, spill gate."""
        self._ensure_background_tasks()
        report = {}
        for model_id, scheduler in self._schedulers.items():
            report[model_id] = {
                "queued": len(scheduler.queue),
                "spill_gate_open": scheduler.gate.is_open,
                "mean_service_ms": round(scheduler.mean_service_ms, 1),
                "predicted_preferred_wait_ms": _finite_or_none(scheduler.predicted_preferred_wait_ms()),
                "spilled": dict(scheduler.spilled),
                "groups": {
                    v.replica_id: {"site": v.site, "slots": v.slots, "in_flight": v.in_flight,
                                   "others_in_flight": scheduler.others_in_flight[v.replica_id], "healthy": v.healthy}
                    for v in scheduler.views()
                },
            }
        dispatch = self._gates.report() if self._gates is not None else None
        return JSONResponse({"router_replica": self._replica_tag, "models": report, "direct_dispatch": dispatch},
                            headers=self._site_headers)

    @api.get("/v1/spillway/splits")
    async def split_stats(self) -> Response:
        """Per-variant counters of this router replica (requests, errors, mean TTFT, output tokens)."""
        report = {
            alias: {
                model: {"requests": st.requests, "errors": st.errors, "mean_ttft_ms": st.mean_ttft_ms,
                        "output_tokens": st.output_tokens}
                for model, st in split.stats.items()
            }
            for alias, split in self._splits.items()
        }
        return JSONResponse({"router_replica": self._replica_tag, "splits": report}, headers=self._site_headers)

    @api.get("/v1/spillway/debug/spans")
    async def debug_spans(self) -> Response:
        """Finished spans of this router replica, only with ``tracing.exporter: memory`` (tests, debugging)."""
        if self._tracing.memory is None:
            raise StarletteHTTPException(404)
        return JSONResponse({"router_replica": self._replica_tag, "spans": self._tracing.memory.finished_spans()},
                            headers=self._site_headers)

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str) -> Response:
        for model in [*self._config.models, *(SimpleNamespace(id=alias) for alias in self._splits)]:
            if model.id == model_id:
                return JSONResponse(
                    {"id": model.id, "object": "model", "created": self._created, "owned_by": "spillway"},
                    headers=self._site_headers,
                )
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ENDPOINT_CHAT)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, ENDPOINT_COMPLETIONS)

    # ---- request path ----------------------------------------------------------------

    def _ensure_background_tasks(self) -> None:
        if self._load_poller is None or self._load_poller.done():
            self._load_poller = asyncio.get_running_loop().create_task(self._poll_engine_load())
        if self._gates is not None and (self._gate_refresher is None or self._gate_refresher.done()):
            self._gate_refresher = asyncio.get_running_loop().create_task(self._refresh_gates())

    async def _refresh_gates(self) -> None:
        """Which engine replicas take direct requests (their addresses in Ray's KV store)."""
        while True:
            await asyncio.to_thread(self._gates.refresh)
            await asyncio.sleep(GATE_REFRESH_S)

    async def _poll_engine_load(self) -> None:
        """Live engine load: KV-cache use (a full cache takes no new request) and, with several
        router replicas, the others' in-flight requests."""
        interval_s = self._config.router.load_poll_interval_ms / 1000

        async def poll(model_id: str, target: EngineTarget) -> None:
            try:
                stats = await asyncio.wait_for(target.handle.stats.remote(), timeout=max(1.0, 4 * interval_s))
            except Exception:  # noqa: BLE001 - an engine that does not answer keeps its last figure
                return
            replicas = self._config.model(model_id).replicas[target.group.site]
            # One replica answers; scale its count to the group (replicas share load evenly under Serve).
            in_flight, kv_cache_usage = int(stats["in_flight"]) * replicas, float(stats["kv_cache_usage"])
            self._schedulers[model_id].observe_engine_load(target.group.group_id, in_flight, kv_cache_usage)
            self._metrics.engine_load(model_id, target.group.site, kv_cache_usage, in_flight)

        while True:
            await asyncio.gather(*(poll(m, t) for m, by_group in self._targets.items() for t in by_group.values()))
            for model_id, scheduler in self._schedulers.items():
                self._metrics.queue(model_id, len(scheduler.queue))
            await asyncio.sleep(interval_s)

    async def _serve(self, request: Request, endpoint: str) -> Response:
        self._ensure_background_tasks()
        request_id = request.headers.get(HEADER_REQUEST_ID) or uuid.uuid4().hex
        trace = self._tracing.start_request(
            request.headers, {"spillway.endpoint": endpoint, "spillway.tenant": _tenant(request),
                              "spillway.request_id": request_id},
        )
        try:
            return await self._serve_traced(request, endpoint, request_id, trace)
        except SpillwayError as exc:
            trace.finish(exc.code or f"http_{exc.status}", exc.status)
            raise
        except BaseException as exc:
            trace.finish(type(exc).__name__, 500)
            raise

    async def _serve_traced(self, request: Request, endpoint: str, request_id: str, trace: RequestTrace) -> Response:
        body = await self._read_body(request)
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise InvalidRequest("'model' is required and must be a string", param="model")
        affinity = body.get("user") if isinstance(body.get("user"), str) else request.headers.get(HEADER_SESSION)
        split = self._splits.get(model_id)
        if split is not None:
            model_id = split.choose(affinity)
            body["model"] = model_id
            trace.set(requested_model=split.alias, variant=model_id)
        trace.set(model=model_id, stream=bool(body.get("stream")))
        scheduler = self._schedulers.get(model_id)
        if scheduler is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        with trace.child("spillway.classify") as span:
            declared = DataClass.parse(request.headers.get(HEADER_DATA_CLASS), default=self._default_class)
            texts = request_texts(body)
            classification = self._classifier.classify(declared, texts)
            if span is not None:
                span.set_attributes({"spillway.declared_class": declared.name,
                                     "spillway.data_class": classification.data_class.name,
                                     "spillway.raised_by": classification.raised_by})
        trace.set(data_class=classification.data_class.name)
        if trace.recording:
            trace.record_content("gen_ai.prompt", "\n".join(texts))
        view = RequestView(request_id, model_id, classification.data_class, affinity_key=affinity)
        priority = _parse_priority(request.headers.get(HEADER_PRIORITY))
        stream = bool(body.get("stream"))
        # Token counts for metrics and cost come from the engine's usage event; ask for it always.
        strip_usage = False
        if stream:
            options = body.get("stream_options")
            if not isinstance(options, dict) or not options.get("include_usage"):
                strip_usage = True
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}

        mode = request.headers.get(HEADER_ROUTING_MODE) if self._config.router.benchmark_modes else None
        if mode == ROUTING_POW2:
            return await self._serve_pow2(scheduler, view, classification, endpoint, body, strip_usage)
        never = frozenset(g for g, t in self._targets[model_id].items() if t.group.site_rank > 0) \
            if mode == ROUTING_ONPREM_ONLY else frozenset()
        started = time.monotonic()
        try:
            slot, status, replica, result = await self._dispatch(
                scheduler, view, priority, endpoint, body, never, trace)
        except SpillwayError as exc:
            self._metrics.finished(model_id, "none", exc.code or str(exc.status))
            if split is not None:
                split.record(model_id, error=True)
            raise
        site = slot.group.site
        cost_per_1k = self._config.site(site).cost_per_1k_tokens
        self._metrics.admitted(model_id, site, slot.queue_ms, slot.spill_reason, len(scheduler.queue),
                               scheduler.in_flight[slot.group.group_id])
        trace.set(site=site, replica=replica, queue_wait_ms=round(slot.queue_ms, 1), spill_reason=slot.spill_reason)
        # x-request-id itself is set on every response by Serve's proxy (from the client's header if sent).
        headers = {
            HEADER_SITE: site,
            HEADER_MODEL: model_id,
            HEADER_DATA_CLASS_OUT: classification.data_class.name,
            HEADER_SPILL_REASON: slot.spill_reason,
            HEADER_QUEUE_MS: f"{slot.queue_ms:.1f}",
        }
        if split is not None:
            headers[HEADER_VARIANT] = model_id
        if not isinstance(result, EngineStream):
            payload = result
            scheduler.release(slot)
            ttft_ms = (time.monotonic() - started) * 1000
            outcome = "ok" if status == 200 else f"http_{status}"
            usage = _usage(payload) if status == 200 else None
            self._metrics.finished(model_id, site, outcome)
            self._metrics.served(model_id, site, ttft_ms if status == 200 else None, None, usage, cost_per_1k)
            if split is not None:
                split.record(model_id, error=status != 200, ttft_ms=ttft_ms, output_tokens=usage[1] if usage else 0)
            if trace.recording and status == 200:
                trace.record_content("gen_ai.completion", payload)
            trace.finish(outcome, status, **_usage_attributes(usage))
            return Response(payload, status_code=status, media_type="application/json", headers=headers)

        def finish(summary: StreamSummary) -> None:
            scheduler.release(slot)
            outcome = "stream_failed" if summary.failed else "ok"
            ttft_ms = None if summary.first_at is None else (summary.first_at - started) * 1000
            itl_ms = summary.itl_ms()
            self._metrics.finished(model_id, site, outcome)
            self._metrics.served(model_id, site, ttft_ms, itl_ms, summary.usage, cost_per_1k)
            if split is not None:
                split.record(model_id, error=summary.failed, ttft_ms=ttft_ms,
                             output_tokens=summary.usage[1] if summary.usage else 0)
            trace.finish(outcome, 200, ttft_ms=_round(ttft_ms), itl_ms=_round(itl_ms), **_usage_attributes(summary.usage))

        return StreamingResponse(_StreamRelay(result, request_id, finish, strip_usage), media_type=SSE_MEDIA_TYPE,
                                 headers=headers)

    async def _dispatch(
        self, scheduler: ModelScheduler, view: RequestView, priority: int, endpoint: str, body: dict,
        never: frozenset[str] = frozenset(), trace: RequestTrace = NO_TRACE,
    ):
        """Get a slot, send the request, wait for the engine's status. Before the first token
        nothing has reached the client, so a failed engine is retried on another eligible one
        (residency still applies: a confidential request only ever retries on-prem)."""
        timeout_s = self._config.router.first_response_timeout_s
        failed: set[str] = set(never)
        failures: list[str] = []
        for attempt in range(1, self._config.router.max_dispatch_attempts + 1):
            if failed and not scheduler.has_candidate(view, frozenset(failed)):
                break
            # A retry jumps the queue: it was admitted before anyone now waiting.
            retry = len(failed) > len(never)
            with trace.child("spillway.admission", attempt=attempt, priority=priority) as span:
                slot = await scheduler.acquire(
                    view, priority + (RETRY_PRIORITY_BOOST if retry else 0), frozenset(failed))
                if span is not None:
                    span.set_attributes({"spillway.queue_wait_ms": round(slot.queue_ms, 1),
                                         "spillway.site": slot.group.site,
                                         "spillway.engine_group": slot.group.group_id,
                                         "spillway.spill_reason": slot.spill_reason})
            trace_headers = trace.start_generation(site=slot.group.site, engine_group=slot.group.group_id,
                                                   attempt=attempt)
            stream = None
            try:
                target = self._targets[view.model][slot.group.group_id]
                direct = await self._dispatch_direct(target, endpoint, body, view.request_id, trace_headers, timeout_s)
                if direct is not None:
                    status, replica, result = direct
                    trace.set_generation(replica=replica, status=status)
                    return slot, status, replica, result
                # One Ray call opens the request; a stream's tokens then come over a direct connection.
                call = target.handle.options(stream=True).open.remote(endpoint, body, view.request_id, trace_headers)
                try:
                    reply = await asyncio.wait_for(call.__anext__(), timeout=timeout_s)
                except BaseException:
                    call.cancel()
                    raise
                status, replica = reply["status"], reply["replica"]
                if "token" in reply:
                    stream = await _connect_stream(reply, call, timeout_s)
                trace.set_generation(replica=replica, status=status)
                return slot, status, replica, (stream if stream is not None else reply["body"])
            except asyncio.CancelledError:
                if stream is not None:
                    stream.close()
                scheduler.release(slot)
                trace.end_generation(outcome="cancelled")
                raise
            except Exception as exc:  # noqa: BLE001 - classified just below
                if stream is not None:
                    stream.close()
                scheduler.release(slot, failed=True)
                trace.end_generation(outcome=f"failed: {type(exc).__name__}")
                if not _is_dispatch_failure(exc):
                    raise
                logger.warning("request %s: %s failed before responding: %r", view.request_id, slot.group.group_id, exc)
                failed.add(slot.group.group_id)
                failures.append(f"{slot.group.site}: {type(exc).__name__}")
        raise EngineUnavailable(
            f"no engine could take the request for model '{view.model}' ({'; '.join(failures)}); retry later",
            retry_after_s=RETRY_AFTER_UNAVAILABLE_S,
        )

    async def _dispatch_direct(self, target: EngineTarget, endpoint: str, body: dict, request_id: str,
                               trace_headers: dict | None, timeout_s: float):
        """The request straight to a replica of the target (see serve_app/router/gates.py); None
        when there is no replica to send it to that way, and the Serve call must carry it."""
        if self._gates is None:
            return None
        handle = target.handle
        gate = self._gates.pick(handle.app_name, handle.deployment_name)
        if gate is not None:
            try:
                opened = await gate.request(handle.deployment_name, endpoint, body, request_id, trace_headers, timeout_s)
            except GateUnavailable as exc:
                logger.info("request %s: direct path to %s unavailable (%s); using the Serve call",
                            request_id, handle.deployment_name, exc)
                if exc.gone:
                    await asyncio.to_thread(self._gates.forget, handle.app_name, handle.deployment_name, gate)
            else:
                self._gates.direct += 1
                return opened
        self._gates.fallback += 1
        return None

    async def _serve_pow2(self, scheduler: ModelScheduler, view: RequestView, classification, endpoint: str,
                          body: dict, strip_usage: bool):
        """Benchmark baseline: Ray Serve's default idea (power of two choices on queue length) across
        every site, with no admission queue and no residency. Requests wait in Serve's handle queue."""
        groups = list(self._targets[view.model].values())
        pair = random.sample(groups, min(2, len(groups)))
        target = min(pair, key=lambda t: self._pow2_in_flight[t.group.group_id])
        self._pow2_in_flight[target.group.group_id] += 1

        def release(*_):
            # Called exactly once: the paths below exclude each other and _Relay finishes once.
            self._pow2_in_flight[target.group.group_id] -= 1

        results = target.handle.options(stream=True).generate.remote(endpoint, body, view.request_id, None)
        try:
            status, _replica = await results.__anext__()
        except BaseException:
            release()
            results.cancel()
            raise
        headers = {HEADER_SITE: target.group.site, HEADER_MODEL: view.model,
                   HEADER_DATA_CLASS_OUT: classification.data_class.name, HEADER_SPILL_REASON: ROUTING_POW2}
        if status != 200 or not body.get("stream"):
            try:
                payload = await results.__anext__()
            finally:
                release()
            return Response(payload, status_code=status, media_type="application/json", headers=headers)
        return StreamingResponse(_Relay(results, view.request_id, release, strip_usage), media_type=SSE_MEDIA_TYPE,
                                 headers=headers)

    async def _read_body(self, request: Request) -> dict:
        limit = self._config.router.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} bytes")
        raw = await request.body()
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {limit} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        return body

    async def _engine_report(self) -> dict[str, dict[str, Any]]:
        async def probe(target: EngineTarget) -> dict[str, Any]:
            try:
                stats = await asyncio.wait_for(target.handle.stats.remote(), timeout=HEALTH_PROBE_TIMEOUT_S)
                return {"healthy": True, **stats}
            except Exception as exc:  # noqa: BLE001 - any failure means unhealthy for this probe
                return {"healthy": False, "error": type(exc).__name__}

        report: dict[str, dict[str, Any]] = {}
        for model_id, by_group in self._targets.items():
            targets = list(by_group.values())
            results = await asyncio.gather(*(probe(t) for t in targets))
            report[model_id] = {t.group.site: r for t, r in zip(targets, results)}
        return report

