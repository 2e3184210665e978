"""The request path: the stages in order, what they share, and the answer they produce.

    auth (key -> tenant, on the head alone) -> parse+validate -> classify -> (semantic route)
        -> resolve model -> access (403, residency) -> redact -> govern (limits, budget: one ledger
        call) -> audit -> (cache) -> (pow2 baseline, benchmark mode only) -> admit -> dispatch
        -> answer (relay for streams)
    and, however the request ends, the outcome sink (metrics, splits, trace, usage and budget
    settlement, the audit record).

Stages in parentheses are there when configured; auth, access, redact, govern and audit when
governance is. Each is one module plus its place in ``stages`` below. A stage that produces the
answer itself (the baseline, a cache hit) ends the walk. The ``Gateway`` holds no per-request
state: any router replica serves any request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from serve_app.config import SiteKind, SpillwayConfig
from serve_app.errors import InvalidRequest, SpillwayError
from serve_app.governance.client import OPEN_WARNING, LedgerClient
from serve_app.governance.cache import ResponseCache
from serve_app.governance.cost import CostModel
from serve_app.http.edge import SSEResponse
from serve_app.http.headers import read_headers
from serve_app.observe.tracing import Tracing
from serve_app.ops.autoscale import REPORT_INTERVAL_S
from serve_app.ops.rollout import SPLIT_POLL_S
from serve_app.pipeline.admit import AdmitStage
from serve_app.pipeline.audit import AuditStage
from serve_app.pipeline.auth import AccessStage, AuthStage
from serve_app.pipeline.baselines import Pow2BaselineStage
from serve_app.pipeline.cache import CacheStage
from serve_app.pipeline.classify import ClassifyStage
from serve_app.pipeline.context import (
    OUTCOME_CANCELLED,
    OUTCOME_OK,
    STATUS_CLIENT_CLOSED,
    RequestContext,
    RequestHeaders,
)
from serve_app.pipeline.dispatch import DispatchStage
from serve_app.pipeline.embedder import PipelineEmbedder
from serve_app.pipeline.govern import GovernStage
from serve_app.pipeline.outcome import OutcomeSink
from serve_app.pipeline.parse import ParseStage
from serve_app.pipeline.redact import RedactStage, StreamRestorer, restore_body
from serve_app.pipeline.relay import relay
from serve_app.pipeline.resolve import ResolveStage
from serve_app.pipeline.route import SemanticStage
from serve_app.pipeline.scan import ScanSpec
from serve_app.pipeline.scanner import Scanner
from serve_app.pipeline.schema import ShapeLimits
from serve_app.policy.classify import DataClass
from serve_app.policy.splits import TrafficSplit, Variant
from serve_app.router.fleet import Fleet
from serve_app.router.placement import build_schedulers, build_targets

HEADER_SITE = "x-spillway-site"
HEADER_MODEL = "x-spillway-model"
HEADER_DATA_CLASS = "x-spillway-data-class"
HEADER_SPILL_REASON = "x-spillway-spill-reason"
HEADER_QUEUE_MS = "x-spillway-queue-ms"
HEADER_VARIANT = "x-spillway-variant"
HEADER_REDACTED = "x-spillway-redacted"  # PII values replaced before the engine, restored in the answer
HEADER_ROUTE = "x-spillway-route"  # semantic routing: "<target>; score=<cosine>; reason=<why>; ms=<step time>"
HEADER_ROUTER = "x-spillway-router"  # the router replica that served it (logs, and tests across replicas)
PROMPT_PREVIEW_CHARS = 8_192
HEALTH_PROBE_TIMEOUT_S = 5.0
SCALE_REPORT_INTERVAL_S = REPORT_INTERVAL_S
SCALE_REPORT_TIMEOUT_S = 2.0

logger = logging.getLogger("spillway.gateway")


class Gateway:
    def __init__(self, config: SpillwayConfig, handles: dict[str, dict[str, Any]], *, ledger=None, metrics=None,
                 directory=None, tracing: Tracing | None = None, clock=time.monotonic, operator=None):
        """``ledger``: the governance ledger's handle (``governance/service.py``); without one (router
        unit tests) there are no keys, limits or budgets."""
        router = config.router
        self.config = config
        self.targets = build_targets(config, handles)
        self.schedulers = build_schedulers(config, self.targets, clock)
        if metrics is None:
            from serve_app.observe.metrics import RouterMetrics

            metrics = RouterMetrics()
        self.metrics = metrics
        self.tracing = tracing or Tracing(config.tracing)
        self.fleet = Fleet(config, self.targets, self.schedulers, metrics, directory=directory, clock=clock)
        self.scanner = Scanner(ScanSpec(
            ShapeLimits(router.max_n, router.max_prompts, router.max_messages, router.max_embedding_inputs), router.max_json_depth,
            tuple(router.pii_detectors),
            tuple((name, tuple(sorted(params.items()))) for name, params in sorted(router.policy_params.items())
                  if name in router.pii_detectors),
            PROMPT_PREVIEW_CHARS if config.tracing.record_content else 0,
            max((route.max_prompt_chars for route in router.semantic_routes.values()), default=0),
        ), router.inline_scan_max_bytes, router.scan_workers)
        self.splits = {alias: TrafficSplit(alias, [Variant(model, weight) for model, weight in split.variants.items()])
                       for alias, split in router.splits.items()}
        self.ledger = LedgerClient(ledger, config.governance) if ledger is not None else None
        self.admin_key = os.environ.get(config.governance.admin_key_env) or None
        caching = config.governance.cache
        self.cache = CacheStage(ResponseCache(caching.max_entries, caching.max_bytes, caching.max_age_s),
                                DataClass[config.router_site.trust]) if caching.enabled else None
        self.sink = OutcomeSink(config, metrics, self.schedulers, self.ledger, self.cache)
        onprem_sites = frozenset(s.name for s in config.sites if s.kind == SiteKind.onprem)
        admit = AdmitStage(self.schedulers, self.targets, onprem_sites)
        governed = self.ledger is not None
        onprem_models = frozenset(m.id for m in config.models if any(n > 0 for s, n in m.replicas.items()
                                                                     if s in onprem_sites))
        dispatch = DispatchStage(self.fleet, admit, self.schedulers, router.max_dispatch_attempts,
                                 router.first_response_timeout_s)
        models = {m.id: m for m in config.models}
        self.semantic = SemanticStage(config, PipelineEmbedder(admit, dispatch, models), metrics) \
            if router.semantic_routes else None
        self.stages: list[Any] = [
            # (the key first: a request without a valid one is refused before its body is read or scanned)
            *([AuthStage(self.ledger)] if governed else []),
            ParseStage(self.scanner, router.max_body_bytes, router.body_timeout_s),
            # (classified before the model is resolved: semantic routing embeds the prompt, and
            # where that may happen depends on the prompt's class)
            ClassifyStage(DataClass[router.default_data_class], DataClass[router.opaque_data_class]),
            *([self.semantic] if self.semantic is not None else []),
            ResolveStage(models, self.splits),
            *([AccessStage(onprem_models)] if governed else []),
            *([RedactStage(self.scanner.spec)] if governed else []),
            *([GovernStage(config, self.ledger, CostModel(config)), AuditStage()] if governed else []),
            *([self.cache] if self.cache is not None else []),
        ]
        if router.benchmark_modes:
            self.stages.append(Pow2BaselineStage(self.targets))
        self.stages += [admit, dispatch]
        self.router_site = config.router_site.name
        self.replica_tag = uuid.uuid4().hex[:8]
        self.created = int(time.time())
        self._warm: asyncio.Task | None = None
        self._warm_routes: asyncio.Task | None = None
        # The operator's handle (ops/operator.py): scale demand and split counters go to it; split
        # weights it publishes (rollouts) come back through Ray's KV store.
        self.operator = operator
        self._operator_tasks: list[asyncio.Task] = []
        self.app_name = config.name  # the Serve application (the Router sets it from its replica context)

    def start(self) -> None:
        """Background work on the running loop (idempotent; called on every request)."""
        self.fleet.start()
        if self.operator is not None and (not self._operator_tasks or any(t.done() for t in self._operator_tasks)):
            for task in self._operator_tasks:
                task.cancel()
            loop = asyncio.get_running_loop()
            self._operator_tasks = [loop.create_task(self._report_to_operator()),
                                    loop.create_task(self._follow_split_weights())]
        if self.ledger is not None:
            self.ledger.start()
        if self._warm is None:
            self._warm = asyncio.get_running_loop().create_task(self.scanner.warm())
        if self.semantic is not None and self._warm_routes is None:
            self._warm_routes = asyncio.get_running_loop().create_task(self.semantic.warm())

    async def close(self) -> None:
        """Stop pollers, close pooled engine connections, the scan helpers and the span exporter."""
        for task in (self._warm, self._warm_routes, *self._operator_tasks):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.fleet.close()
        if self.ledger is not None:
            await self.ledger.close()
        await self.scanner.close()
        self.tracing.shutdown()

    async def handle(self, request, endpoint: str, owner: list) -> Response:
        """One OpenAI request; ``owner`` (the HTTP edge's) closes its context when the request ends."""
        self.start()
        error = None
        try:
            headers = read_headers(request.headers, self.config.router.benchmark_modes)
        except InvalidRequest as exc:
            headers, error = RequestHeaders(request_id=uuid.uuid4().hex), exc
        trace = self.tracing.start_request(request.headers, {
            "spillway.endpoint": endpoint, "spillway.tenant": headers.tenant, "spillway.request_id": headers.request_id})
        ctx = RequestContext(endpoint, headers, trace, request=request, _sink=self.sink)
        owner.append(ctx)
        try:
            if error is not None:
                raise error
            for stage in self.stages:
                await stage.run(ctx)
                if ctx.reply is not None:
                    break
        except SpillwayError as exc:
            ctx.finish(exc.status, exc.code or f"http_{exc.status}")
            if ctx.split is not None and ctx.model:  # which variant failed: A/B and rollout clients see it
                exc.headers = {**exc.headers, HEADER_VARIANT: ctx.model}
            raise
        except ClientDisconnect:
            ctx.finish(STATUS_CLIENT_CLOSED, OUTCOME_CANCELLED)
            raise
        except Exception:
            ctx.finish(500, "internal_error")
            raise
        return self._answer(ctx)

    def _answer(self, ctx: RequestContext) -> Response:
        reply, lease = ctx.reply, ctx.lease
        headers = {
            HEADER_SITE: lease.group.site if lease is not None else ctx.site,
            HEADER_MODEL: ctx.model,
            HEADER_DATA_CLASS: ctx.classification.data_class.name,
            HEADER_SPILL_REASON: lease.spill_reason if lease is not None else ctx.headers.routing_mode,
            HEADER_QUEUE_MS: f"{lease.queue_ms:.1f}" if lease is not None else "0.0",
            HEADER_ROUTER: self.replica_tag,
        }
        if ctx.split is not None:
            headers[HEADER_VARIANT] = ctx.model
        if ctx.route is not None:
            headers[HEADER_ROUTE] = route_header(ctx.route)
        if headers[HEADER_SPILL_REASON] is None:  # not placed: a cache hit
            del headers[HEADER_SPILL_REASON]
        headers.update(ctx.response_headers)
        body = reply.body
        if ctx.redaction is not None:  # the values go back in the answer only (never into reply.body)
            headers[HEADER_REDACTED] = str(len(ctx.redaction.values))
            if reply.stream is not None:
                ctx.restorer = StreamRestorer(ctx.redaction)
            elif body:
                body = restore_body(body, ctx.redaction)
        if reply.stream is None:
            ctx.summary.first_at = time.monotonic()
            ctx.engine_done()
            ctx.finish(reply.status, OUTCOME_OK if reply.status == 200 else f"http_{reply.status}")
            return Response(body, status_code=reply.status, media_type="application/json", headers=headers)
        return SSEResponse(lambda edge: relay(ctx, edge), headers)

    def scale_demand(self) -> dict[str, int]:
        """Sequences that want each autoscaled engine deployment, by deployment name."""
        demand: dict[str, int] = {}
        for model_id, scheduler in self.schedulers.items():
            for group_id, sequences in scheduler.scale_demand().items():
                demand[self.targets[model_id][group_id].deployment] = sequences
        return demand

    async def _report_to_operator(self) -> None:
        """Tell the operator what this router's requests want (scale demand) and how each split's
        variants did (cumulative counters), every ``REPORT_INTERVAL_S`` (a report that does not
        arrive is replaced by the next one)."""
        while True:
            try:
                async with asyncio.timeout(SCALE_REPORT_TIMEOUT_S):
                    await self.operator.report.remote(
                        self.replica_tag, self.scale_demand(),
                        {alias: split.counters() for alias, split in self.splits.items()})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the operator must never break the request path
                logger.warning("could not report to the operator: %s", exc)
            await asyncio.sleep(SCALE_REPORT_INTERVAL_S)

    async def _follow_split_weights(self) -> None:
        """Apply the split weights the operator published (rollouts), within ``SPLIT_POLL_S``."""
        from serve_app.ops.operator import read_splits

        while True:
            try:
                self.apply_split_weights(await asyncio.to_thread(read_splits, self.app_name))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the last weights stay in force
                logger.warning("could not read split weights: %s", exc)
            await asyncio.sleep(SPLIT_POLL_S)

    def apply_split_weights(self, overrides: dict[str, dict[str, float]]) -> None:
        """Published weights per alias, on the event loop. An alias may be new (a rollout of a name
        no split configures) but never a model id; unknown models are ignored."""
        models = {m.id for m in self.config.models}
        for alias, weights in overrides.items():
            weights = {m: w for m, w in weights.items() if m in models}
            if alias in models or not weights or sum(weights.values()) <= 0:
                continue
            split = self.splits.get(alias)
            if split is None:
                self.splits[alias] = TrafficSplit(alias, [Variant(m, w) for m, w in weights.items()])
            elif {v.model: v.weight for v in split.variants} != weights:
                split.set_weights(weights)

    # ---- reports ---------------------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict]:
        self.start()
        report = await self.fleet.engine_report(HEALTH_PROBE_TIMEOUT_S)
        healthy = all(any(site["healthy"] for site in sites.values()) for sites in report.values())
        return healthy, {"status": "ok" if healthy else "degraded", "auth": self.auth_mode(), "models": report}

    def auth_mode(self) -> dict:
        if self.ledger is None or self.ledger.table is None:
            return {"mode": "open" if self.ledger is None else "starting"}
        if self.ledger.table.open:
            return {"mode": "open", "warning": OPEN_WARNING}
        return {"mode": "keys"}

    def models(self) -> list[dict]:
        data = [{"id": m.id, "object": "model", "created": self.created, "owned_by": "spillway",
                 "max_model_len": m.engine.max_model_len, "sites": sorted(s for s, n in m.replicas.items() if n > 0)}
                for m in self.config.models]
        data += [{"id": alias, "object": "model", "created": self.created, "owned_by": "spillway",
                  "variants": {v.model: v.weight for v in split.variants}} for alias, split in self.splits.items()]
        data += [{"id": alias, "object": "model", "created": self.created, "owned_by": "spillway",
                  "routes_to": {name: target.model for name, target in route.targets.items()}}
                 for alias, route in self.config.router.semantic_routes.items()]
        return data

    def scheduler_report(self) -> dict:
        self.start()
        models = {}
        for model_id, scheduler in self.schedulers.items():
            wait = scheduler.predicted_preferred_wait_ms()
            models[model_id] = {**scheduler.report(),
                                "predicted_preferred_wait_ms": round(wait, 1) if wait != float("inf") else None}
        return {"router_replica": self.replica_tag, "models": models, "direct_dispatch": self.fleet.report(),
                "streams": self.sink.streams, "scan": {"offloaded": self.scanner.offloaded}}

    def split_report(self) -> dict:
        return {"router_replica": self.replica_tag, "splits": {
            alias: {model: {"requests": st.requests, "errors": st.errors, "mean_ttft_ms": st.mean_ttft_ms,
                            "output_tokens": st.output_tokens} for model, st in split.stats.items()}
            for alias, split in self.splits.items()}}


def route_header(choice) -> str:
    parts = [choice.target, f"reason={choice.reason}"]
    if choice.score is not None:
        parts.insert(1, f"score={choice.score:.4f}")
    if choice.fallback_from is not None:
        parts.append(f"fallback_from={choice.fallback_from}")
    if choice.latency_ms is not None:
        parts.append(f"ms={choice.latency_ms:.1f}")
    return "; ".join(parts)
