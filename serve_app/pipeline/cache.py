"""The cache stage: a deterministic request (temperature 0 or a fixed seed) whose answer the
router's site may hold is looked up in the router's response cache (``governance/cache.py``).

- A hit ends the pipeline: no admission, no engine. It is answered as the engine answered the
  first time (a stream for a streamed request), marked ``x-spillway-cache: hit``, settled with
  the ledger at no cost and no tokens, and audited as a hit (site ``cache``).
- A miss is marked ``x-spillway-cache: miss``; the outcome sink stores the answer if it succeeded.
- Residency: answers are kept in the router's memory, so only requests whose data class the
  router's site is trusted with are cached (a router on a cloud site caches no confidential
  answer). Entries are per tenant: the key holds the tenant.
"""

from __future__ import annotations

from serve_app.governance.cache import ResponseCache, cache_key
from serve_app.pipeline.context import RequestContext
from serve_app.policy.classify import DataClass
from serve_app.transport.base import EngineReply, EngineStream

HEADER_CACHE = "x-spillway-cache"
CACHE_SITE = "cache"


class _Ended:
    """A reader at its end: a cached stream is all in its head."""

    async def read(self, _n: int) -> bytes:
        return b""


class CacheStage:
    name = "cache"

    def __init__(self, cache: ResponseCache, trusted_up_to: DataClass):
        self.cache = cache
        self.trusted_up_to = trusted_up_to

    async def run(self, ctx: RequestContext) -> None:
        if not ctx.shape.deterministic or ctx.classification.data_class > self.trusted_up_to or \
                ctx.redaction is not None:  # placeholders stand for this request's values only
            return
        tenant = ctx.principal.tenant if ctx.principal is not None else ctx.headers.tenant
        key = cache_key(tenant, ctx.endpoint, ctx.model, ctx.scan.rest)
        answer = self.cache.get(key)
        if answer is None:
            ctx.cache_key = key
            ctx.response_headers[HEADER_CACHE] = "miss"
            if ctx.stream and ctx.captured is None:
                ctx.captured = bytearray()
            return
        ctx.cache_hit = True
        ctx.site = CACHE_SITE
        ctx.response_headers[HEADER_CACHE] = "hit"
        if answer.stream:
            ctx.reply = EngineReply(200, CACHE_SITE, stream=EngineStream(_Ended(), None, CACHE_SITE, head=answer.body))
        else:
            ctx.reply = EngineReply(200, CACHE_SITE, body=answer.body)

    def store(self, ctx: RequestContext) -> None:
        """The outcome sink's call for a finished miss."""
        reply = ctx.reply
        if ctx.stream:
            if ctx.captured and bytes(ctx.captured[-14:]).endswith(b"data: [DONE]\n\n"):
                self.cache.put(ctx.cache_key, bytes(ctx.captured), True)
        elif reply is not None and reply.body:
            self.cache.put(ctx.cache_key, reply.body, False)
