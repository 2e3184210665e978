"""Stage: send the request to an engine, failing over until something reaches the client.

The lease names an engine group; the fleet picks a replica of it and a transport
(``router/fleet.py``). Until the client has received anything, a request that could not be
taken or finished (a ``TransportError``: no connection, no acceptance within
``first_response_timeout_s``, a dead engine, a stream that broke before its first event) is
retried: its lease is given back, the failed replica is held out for ``replica_cooldown_s``, and
a new lease is taken (a retry jumps the queue and may go to any group residency allows, so a
confidential request only ever retries on-prem). A stream's first event is read here, before
the response starts, so a failure before the first token never reaches the client.

Any engine answer, 4xx or 5xx, is the request's own and never counts against the engine; only a
5xx from a dead engine fails over (the engine says so). An engine that is full (other routers
took its sequences since this router's last load poll) is no failure either: the request goes
back to the queue with its original arrival time, so it keeps its place and its TTFT budget.
"""

from __future__ import annotations

import logging
import time

from serve_app.errors import EngineUnavailable
from serve_app.pipeline.admit import AdmitStage
from serve_app.pipeline.context import RequestContext
from serve_app.router.fleet import Fleet
from serve_app.router.scheduler import ModelScheduler
from serve_app.transport.base import EngineFull, EngineRequest, TransportError

logger = logging.getLogger("spillway.dispatch")

RETRY_AFTER_UNAVAILABLE_S = 5
# A loop guard: a request turned away by full engines this often gets a 503. What bounds its wait
# is the queue's max_wait_ms, counted from its first arrival however often it is queued again.
MAX_FULL_BOUNCES = 1000


class DispatchStage:
    name = "dispatch"

    def __init__(self, fleet: Fleet, admit: AdmitStage, schedulers: dict[str, ModelScheduler],
                 max_attempts: int, accept_timeout_s: float):
        self._fleet = fleet
        self._admit = admit
        self._schedulers = schedulers
        self._max_attempts = max_attempts
        self._timeout_s = accept_timeout_s

    async def run(self, ctx: RequestContext) -> None:
        body = ctx.engine_body()
        failures: list[str] = []
        bounces = 0
        while ctx.attempts < self._max_attempts:
            ctx.attempts += 1
            lease = ctx.lease
            target = self._fleet.targets[ctx.model][lease.group.group_id]
            trace_headers = ctx.trace.start_generation(site=lease.group.site, engine_group=lease.group.group_id,
                                                       attempt=ctx.attempts)
            request = EngineRequest(ctx.endpoint, body, ctx.request_id, ctx.stream, trace_headers, ctx.sequences)
            try:
                ctx.reply = await self._fleet.send(target, request, self._timeout_s)  # the context owns it now
                if ctx.reply.stream is not None:
                    lease.streaming = True
                    await ctx.reply.stream.read_first()
                    ctx.summary.first_at = lease.first_token_at = time.monotonic()
            except EngineFull:
                # Other routers filled the group since our last load poll: nothing started, and
                # nothing failed. Back in the queue, with its place and budget (it may spill now).
                ctx.lease = None
                lease.release(engine_full=True)
                ctx.trace.end_generation(outcome="engine_full")
                ctx.attempts -= 1
                bounces += 1
                if bounces > MAX_FULL_BOUNCES:
                    break
                ctx.lease = await self._admit.acquire(ctx, retry=False,
                                                      arrived_at=lease.acquired_at - lease.queue_ms / 1000)
                continue
            except TransportError as exc:
                if ctx.reply is not None:
                    ctx.reply.close()
                    ctx.reply = None
                ctx.lease = None
                lease.release()
                self._fleet.cool_down(target, exc.replica)
                ctx.trace.end_generation(outcome=f"failed: {type(exc).__name__}")
                logger.warning("request %s: %s failed before its first byte: %s", ctx.request_id,
                               lease.group.group_id, exc)
                failures.append(f"{lease.group.site}: {exc}")
                if ctx.attempts >= self._max_attempts or not self._schedulers[ctx.model].has_candidate(
                        self._admit.request_view(ctx)):
                    break
                ctx.lease = await self._admit.acquire(ctx, retry=True)
                continue
            ctx.trace.set_generation(replica=ctx.reply.replica, status=ctx.reply.status)
            return
        raise EngineUnavailable(
            f"no engine could take the request for model '{ctx.model}' ({'; '.join(failures) or 'all full'}); "
            "retry later", retry_after_s=RETRY_AFTER_UNAVAILABLE_S)
