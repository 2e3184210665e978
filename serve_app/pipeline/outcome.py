"""The one place a finished request is reported: metrics, split counters, the predictor's learning,
the trace, and its settlement with the ledger (usage, spend; the reservation of a keyed request
given back), and its audit record (``governance/audit.py``), which travels with the settlements.

It runs once per request, from ``RequestContext.close``, whatever the outcome. What a request
used: the engine's usage when it reported one; for a request cut short after it reached an
engine (the client gone, an error mid-stream), the prompt estimate and the tokens streamed; for
one that never reached an engine, nothing.
"""

from __future__ import annotations

import time

from serve_app.config import SpillwayConfig
from serve_app.governance.budgets import to_micros
from serve_app.governance.cost import CostModel
from serve_app.governance.messages import Settlement
from serve_app.pipeline.context import OUTCOME_OK, RequestContext
from serve_app.pipeline.relay import usage_of
from serve_app.router.scheduler import ModelScheduler

NO_SITE = "none"


class OutcomeSink:
    def __init__(self, config: SpillwayConfig, metrics, schedulers: dict[str, ModelScheduler], ledger=None,
                 cache=None):
        self._costs = CostModel(config)
        self._cache = cache  # CacheStage: stores a finished miss
        self._metrics = metrics
        self._schedulers = schedulers
        self._ledger = ledger  # LedgerClient
        self.streams = {"spliced": 0, "relayed": 0}  # streamed answers, by how they reached the client

    def __call__(self, ctx: RequestContext) -> None:
        model = ctx.model or "none"
        lease = ctx.lease
        site = lease.group.site if lease is not None else (ctx.site or NO_SITE)
        summary = ctx.summary
        ok = ctx.outcome == OUTCOME_OK
        reply = ctx.reply
        if reply is not None and reply.stream is None:
            summary.usage = usage_of(reply.body) if reply.status == 200 else None
        elif reply is not None:
            self.streams["spliced" if summary.spliced else "relayed"] += 1
        ttft_ms = None if summary.first_at is None or not ok else (summary.first_at - ctx.started_at) * 1000
        itl_ms = summary.itl_ms() if ok and ctx.stream else None
        if lease is not None:
            self._metrics.admitted(model, site, lease.queue_ms, lease.spill_reason)
        if (lease is not None and lease.budget_miss) or ctx.budget_miss:
            self._metrics.budget_miss(model)
        self._metrics.finished(model, site, ctx.outcome)
        cost = 0.0 if ctx.cache_hit else self._costs.request_cost(model, site, summary.usage)
        if ctx.cache_key is not None and ok and reply is not None and reply.status == 200 and self._cache is not None:
            self._cache.store(ctx)
        self._metrics.served(model, site, ttft_ms, itl_ms, summary.usage, cost)
        if ctx.split is not None and ctx.model:
            ctx.split.record(ctx.model, error=not ok, server_error=ctx.status >= 500, ttft_ms=ttft_ms,
                             output_tokens=summary.usage[1] if summary.usage else 0)
        if ok and summary.usage is not None and ctx.model in self._schedulers:
            self._schedulers[ctx.model].observe_usage(ctx.shape.max_tokens, summary.usage[1], ctx.sequences)
        if self._ledger is not None:
            self._settle(ctx, site)
            self._ledger.audit(audit_record(ctx, site, cost, self._ledger.router_id))
        attributes = {"ttft_ms": _round(ttft_ms), "itl_ms": _round(itl_ms)}
        if lease is not None:
            attributes.update(site=site, queue_wait_ms=round(lease.queue_ms, 1), spill_reason=lease.spill_reason)
        if reply is not None:
            attributes.update(replica=reply.replica)
        if summary.usage is not None:
            attributes.update(input_tokens=summary.usage[0], output_tokens=summary.usage[1], cost=cost)
        if ok and reply is not None and reply.body is not None and ctx.trace.recording:
            ctx.trace.record_content("gen_ai.completion", reply.body.decode("utf-8", "replace"))
        ctx.trace.finish(ctx.outcome, ctx.status, **attributes)


    def _settle(self, ctx: RequestContext, site: str) -> None:
        principal, admission = ctx.principal, ctx.admission
        if principal is None or not ctx.model or (principal.key_id is not None and admission is None):
            return  # refused before it was admitted: nothing reserved, nothing used
        usage = ctx.summary.usage
        if ctx.cache_hit:
            usage = (0, 0)  # served from the cache: no tokens, no cost
        elif usage is None:
            usage = (ctx.prompt_tokens_estimate, ctx.summary.events) if ctx.reply is not None else (0, 0)
        cost = to_micros(self._costs.request_cost(ctx.model, site, usage)) if site != NO_SITE and not ctx.cache_hit \
            else 0
        self._ledger.settle(Settlement(
            self._ledger.router_id, admission.reservation if admission else None, principal.key_id, principal.tenant,
            ctx.model, site, usage[0], usage[1], cost, admission.accounts if admission else ()))


def audit_record(ctx: RequestContext, site: str, cost: float | None, router: str) -> dict:
    """What the audit log keeps of one request: who, what, where, how long, how much, how it
    ended. No text, unless the tenant opted in for this request's data class (``AuditStage``)."""
    principal, lease, reply = ctx.principal, ctx.lease, ctx.reply
    classification = ctx.classification
    usage = ctx.summary.usage
    record = {
        "at": round(time.time(), 6),
        "request_id": ctx.request_id,
        "endpoint": ctx.endpoint,
        "tenant": principal.tenant if principal is not None else None,
        "key_id": principal.key_id if principal is not None else None,
        "model": ctx.requested_model or None,
        "variant": ctx.model or None,
        "data_class": classification.data_class.name if classification is not None else None,
        "detectors": classification.raised_by if classification is not None else [],
        "site": site if site != NO_SITE else None,
        "replica": reply.replica if reply is not None else None,
        "router": router,
        "queue_ms": round(lease.queue_ms, 1) if lease is not None else None,
        "spill_reason": lease.spill_reason if lease is not None else None,
        "prompt_tokens": usage[0] if usage else None,
        "completion_tokens": usage[1] if usage else None,
        "cost": cost if site != NO_SITE else 0.0,
        "status": ctx.status,
        "outcome": ctx.outcome,
        "cache": "hit" if ctx.cache_hit else ("miss" if ctx.cache_key else None),
        "redacted": len(ctx.redaction.values) if ctx.redaction is not None else 0,
    }
    if ctx.route is not None:  # semantic routing: the target chosen, its score and why
        record["route"] = {"target": ctx.route.target, "score": ctx.route.score, "reason": ctx.route.reason,
                           "fallback_from": ctx.route.fallback_from}
    if ctx.audit_text:
        completion = bytes(ctx.captured) if ctx.stream else (reply.body if reply is not None else None)
        record["text"] = {"request": ctx.scan.rest.decode("utf-8", "replace") if ctx.scan is not None else None,
                          "response": completion.decode("utf-8", "replace") if completion else None}
    return record


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
