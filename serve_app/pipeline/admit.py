"""Stage: admission, a lease on engine sequences from the model's scheduler."""

from __future__ import annotations

from serve_app.pipeline.context import RequestContext
from serve_app.pipeline.resolve import affinity_key
from serve_app.policy.placement import RequestView
from serve_app.router.lease import Lease
from serve_app.router.placement import EngineTarget
from serve_app.router.scheduler import ModelScheduler, QueueTimeout

ROUTING_ONPREM_ONLY = "onprem-only"  # benchmark baseline: never leave the preferred site


class AdmitStage:
    """A lease on engine sequences from the model's scheduler (``router/scheduler.py``): waits in
    the model's queue while every group the request may use is full."""

    name = "admit"

    def __init__(self, schedulers: dict[str, ModelScheduler], targets: dict[str, dict[str, EngineTarget]],
                 onprem_sites: frozenset[str] = frozenset()):
        self._schedulers = schedulers
        self._targets = targets
        # Groups off on-prem sites, per model: what a request bound to on-prem may not use.
        self._offprem = {model: frozenset(g for g, t in groups.items() if t.group.site not in onprem_sites)
                         for model, groups in targets.items()}

    async def run(self, ctx: RequestContext) -> None:
        ctx.lease = await self.acquire(ctx, retry=False)

    def request_view(self, ctx: RequestContext) -> RequestView:
        return RequestView(ctx.request_id, ctx.model, ctx.classification.data_class, affinity_key=affinity_key(ctx),
                           sequences=ctx.sequences)

    async def acquire(self, ctx: RequestContext, retry: bool, arrived_at: float | None = None) -> Lease:
        """A lease for the request; ``retry`` after a failed attempt jumps the queue and may go to
        any group residency allows; ``arrived_at`` keeps a re-queued request's place."""
        exclude = frozenset()
        if ctx.headers.routing_mode == ROUTING_ONPREM_ONLY:
            exclude = frozenset(g for g, t in self._targets[ctx.model].items() if t.group.site_rank > 0)
        if ctx.onprem_only:  # residency of its key or tenant, or a spent budget with the on-prem-only policy
            exclude = exclude | self._offprem[ctx.model]
        with ctx.trace.child("spillway.admission", attempt=ctx.attempts + 1, priority=ctx.headers.priority) as span:
            try:
                lease = await self._schedulers[ctx.model].acquire(
                    self.request_view(ctx), ctx.headers.priority, max_tokens=ctx.shape.max_tokens, retry=retry,
                    exclude=exclude, arrived_at=arrived_at)
            except QueueTimeout as exc:
                ctx.budget_miss = exc.budget_miss
                raise
            if span is not None:
                span.set_attributes({"spillway.queue_wait_ms": round(lease.queue_ms, 1),
                                     "spillway.site": lease.group.site, "spillway.engine_group": lease.group.group_id,
                                     "spillway.spill_reason": lease.spill_reason})
        return lease
