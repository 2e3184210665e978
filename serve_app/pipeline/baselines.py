"""The routing benchmark's Ray Serve-style baseline, kept out of the production path.

With ``router.benchmark_modes`` on, ``x-spillway-routing: pow2`` sends a request the way Ray
Serve's default router would: power of two choices on this router's in-flight count across every
site, no admission queue, no residency, one Serve streaming call whose every SSE event is a Ray
object. The stage answers the request itself, so the stages after it do not run.
(``onprem-only``, the other baseline, is an admission option: ``pipeline/admit.py``.)
"""

from __future__ import annotations

import random
from collections import Counter

from serve_app.pipeline.context import RequestContext
from serve_app.router.placement import EngineTarget
from serve_app.transport.base import EngineReply, EngineStream

ROUTING_POW2 = "pow2"


class _RayEvents:
    """A reader over a Ray Serve streaming call of SSE strings (what the relay reads)."""

    def __init__(self, call):
        self._call = call

    async def read(self, _size: int) -> bytes:
        try:
            return (await self._call.__anext__()).encode()
        except StopAsyncIteration:
            return b""


class Pow2BaselineStage:
    name = "pow2_baseline"

    def __init__(self, targets: dict[str, dict[str, EngineTarget]]):
        self._targets = targets
        self.in_flight: Counter[str] = Counter()

    async def run(self, ctx: RequestContext) -> None:
        if ctx.headers.routing_mode != ROUTING_POW2:
            return
        groups = [t for t in self._targets[ctx.model].values() if t.external is None]
        if not groups:
            return  # (a model only an external site serves: normal admission)
        target = min(random.sample(groups, min(2, len(groups))), key=lambda t: self.in_flight[t.group.group_id])
        group_id = target.group.group_id
        self.in_flight[group_id] += 1
        ctx.own(lambda: self.in_flight.subtract([group_id]))
        call = target.handle.options(stream=True).generate.remote(ctx.endpoint, ctx.engine_body(), ctx.request_id, None)
        ctx.own(call.cancel)
        status, replica = await call.__anext__()
        ctx.site = target.group.site
        if status != 200 or not ctx.stream:
            ctx.reply = EngineReply(status, replica, body=(await call.__anext__()).encode())
            return
        ctx.reply = EngineReply(status, replica, stream=EngineStream(_RayEvents(call), None, replica, call=call))
