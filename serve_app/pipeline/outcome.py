"""The one place a finished request is reported: metrics, split counters, the predictor's learning,
and the trace. (Usage accounting, budget settlement and the audit record join here later.)

It runs once per request, from ``RequestContext.close``, whatever the outcome.
"""

from __future__ import annotations

from serve_app.config import SpillwayConfig
from serve_app.governance.cost import CostModel
from serve_app.pipeline.context import OUTCOME_OK, RequestContext
from serve_app.pipeline.relay import usage_of
from serve_app.router.scheduler import ModelScheduler

NO_SITE = "none"


class OutcomeSink:
    def __init__(self, config: SpillwayConfig, metrics, schedulers: dict[str, ModelScheduler]):
        self._costs = CostModel(config)
        self._metrics = metrics
        self._schedulers = schedulers

    def __call__(self, ctx: RequestContext) -> None:
        model = ctx.model or "none"
        lease = ctx.lease
        site = lease.group.site if lease is not None else (ctx.site or NO_SITE)
        summary = ctx.summary
        ok = ctx.outcome == OUTCOME_OK
        reply = ctx.reply
        if reply is not None and reply.stream is None:
            summary.usage = usage_of(reply.body) if reply.status == 200 else None
        ttft_ms = None if summary.first_at is None or not ok else (summary.first_at - ctx.started_at) * 1000
        itl_ms = summary.itl_ms() if ok and ctx.stream else None
        if lease is not None:
            self._metrics.admitted(model, site, lease.queue_ms, lease.spill_reason)
        if (lease is not None and lease.budget_miss) or ctx.budget_miss:
            self._metrics.budget_miss(model)
        self._metrics.finished(model, site, ctx.outcome)
        cost = self._costs.request_cost(model, site, summary.usage)
        self._metrics.served(model, site, ttft_ms, itl_ms, summary.usage, cost)
        if ctx.split is not None and ctx.model:
            ctx.split.record(ctx.model, error=not ok, ttft_ms=ttft_ms,
                             output_tokens=summary.usage[1] if summary.usage else 0)
        if ok and summary.usage is not None and ctx.model in self._schedulers:
            self._schedulers[ctx.model].observe_usage(ctx.shape.max_tokens, summary.usage[1])
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


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
